"""The ring protocol as pure logic (a MsgRing in ordinary memory, futexes recorded), and the shared area."""

import ctypes
import os

import pytest

from mpvmm.errors import DeviceModelError
from mpvmm.transport import ring
from mpvmm.transport.ring import MESSAGE_SIZE, RING_SLOTS, MessageRing, MsgRing, RingArea, area_size
from tests.conftest import ipc_objects


class Futexes:
    """Records the futex calls a ring makes, instead of making them."""

    def __init__(self):
        self.woken, self.waited = [], []

    def ring(self, memory=None):
        memory = memory if memory is not None else MsgRing()
        return MessageRing(memory, fence=lambda: None, futex_wake=self.woken.append,
                           futex_wait=lambda address, expected, ns: self.waited.append((address, expected, ns)))


def test_records_come_out_in_order_and_whole():
    r = Futexes().ring()
    records = [b"", b"a", bytes(range(MESSAGE_SIZE))]
    for record in records:
        assert r.push(record)
    assert len(r) == 3
    assert [r.pop() for _ in range(3)] == records
    assert r.pop() is None and len(r) == 0


def test_a_full_ring_refuses_and_frees_one_slot_per_pop():
    r = Futexes().ring()
    assert all(r.push(b"%d" % i) for i in range(RING_SLOTS))
    assert not r.push(b"more") and len(r) == RING_SLOTS
    assert r.pop() == b"0"
    assert r.push(b"more") and not r.push(b"again")


def test_indices_wrap_at_32_bits():
    memory = MsgRing()
    memory.head = memory.tail = 2**32 - 2  # two records short of wrapping
    r = Futexes().ring(memory)
    for i in range(5):
        assert r.push(b"%d" % i)
    assert memory.head == 3 and len(r) == 5
    assert [r.pop() for _ in range(5)] == [b"%d" % i for i in range(5)]
    assert memory.tail == 3


def test_a_record_larger_than_a_slot_is_refused():
    with pytest.raises(ValueError):
        Futexes().ring().push(bytes(MESSAGE_SIZE + 1))


def test_a_corrupt_slot_length_comes_out_too_large_for_the_decoder():
    memory = MsgRing()
    r = Futexes().ring(memory)
    r.push(b"ok")
    memory.slots[0].length = 2**31
    record = r.pop()
    assert len(record) == MESSAGE_SIZE + 1  # the decoder's "too_large", so it is counted and dropped
    assert memory.tail == 1


def test_the_other_side_is_woken_only_when_it_waits():
    futexes = Futexes()
    memory = MsgRing()
    r = futexes.ring(memory)
    r.push(b"x")
    assert not r.wake_consumer() and futexes.woken == []
    memory.consumer_waiting = 1
    assert r.wake_consumer()
    assert futexes.woken == [ctypes.addressof(memory) + MsgRing.head.offset]
    assert not r.wake_producer()
    memory.producer_waiting = 1
    assert r.wake_producer()
    assert futexes.woken[-1] == ctypes.addressof(memory) + MsgRing.tail.offset


def test_a_consumer_sleeps_only_on_an_empty_ring_and_says_so_meanwhile():
    futexes = Futexes()
    memory = MsgRing()
    seen = []
    r = MessageRing(memory, fence=lambda: seen.append(memory.consumer_waiting), futex_wake=futexes.woken.append,
                    futex_wait=lambda *args: futexes.waited.append(args))
    assert r.wait_for_record(0.1)
    assert futexes.waited == [(ctypes.addressof(memory) + MsgRing.head.offset, 0, 100_000_000)]
    assert seen == [1] and memory.consumer_waiting == 0  # flagged before the fence, cleared after
    r.push(b"x")
    assert not r.wait_for_record(0.1) and len(futexes.waited) == 1  # a record is there: no sleep


def test_a_producer_sleeps_only_on_a_full_ring():
    futexes = Futexes()
    memory = MsgRing()
    r = futexes.ring(memory)
    r.wait_for_space(0.1)
    assert futexes.waited == []
    for _ in range(RING_SLOTS):
        r.push(b"x")
    r.wait_for_space(0.05)
    assert futexes.waited == [(ctypes.addressof(memory) + MsgRing.tail.offset, 0, 50_000_000)]
    assert memory.producer_waiting == 0


def test_area_is_nameless_zeroed_and_attachable(kvm_available):
    before = ipc_objects()
    area = RingArea.create(3)
    try:
        assert ipc_objects() == before  # unlinked the moment it was mapped
        assert area.size == area_size(3) == ring.HEADER_SIZE + 6 * ctypes.sizeof(MsgRing)
        assert area.requests(2).address == area.address + ring.HEADER_SIZE + 4 * ctypes.sizeof(MsgRing)
        assert area.replies(2).address == area.requests(2).address + ctypes.sizeof(MsgRing)
        area.requests(1).push(b"hello")
        other = RingArea.attach(os.dup(area.fd))  # the device model's side: another mapping of the same pages
        try:
            assert other.cpus == 3 and other.requests(1).pop() == b"hello"
            assert len(area.requests(1)) == 0
        finally:
            other.close()
    finally:
        area.close()
    area.close()  # idempotent
    assert area.fd == -1


def test_attach_refuses_what_is_not_a_ring_area(tmp_path):
    path = tmp_path / "not-rings"
    path.write_bytes(bytes(ring.HEADER_SIZE * 2))
    for content in (bytes(ring.HEADER_SIZE * 2), b"short"):
        path.write_bytes(content)
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(DeviceModelError, match="ring area"):
                RingArea.attach(fd)
        finally:
            os.close(fd)
