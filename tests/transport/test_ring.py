"""ring.h's protocol as pure logic (a MsgRing in this process's memory), and the shared area."""

import ctypes
import os
import threading
import time

import pytest

from mpvmm.errors import DeviceModelError
from mpvmm.transport import ring
from mpvmm.transport.ring import MESSAGE_SIZE, RING_SLOTS, MessageRing, MsgRing, RingArea, area_size
from tests.conftest import ipc_objects


@pytest.fixture
def memory():
    return MsgRing()  # a ring in ordinary memory: ring.h's logic with no other process or kernel object


def ring_at(memory):
    return MessageRing(ctypes.addressof(memory))


def test_records_come_out_in_order_and_whole(memory):
    r = ring_at(memory)
    records = [b"", b"a", bytes(range(MESSAGE_SIZE))]
    for record in records:
        assert r.push(record)
    assert len(r) == 3
    assert [r.pop() for _ in range(3)] == records
    assert r.pop() is None and len(r) == 0


def test_a_full_ring_refuses_and_frees_one_slot_per_pop(memory):
    r = ring_at(memory)
    assert all(r.push(b"%d" % i) for i in range(RING_SLOTS))
    assert not r.push(b"more") and len(r) == RING_SLOTS
    assert r.pop() == b"0"
    assert r.push(b"more") and not r.push(b"again")


def test_indices_wrap_at_32_bits(memory):
    memory.head = memory.tail = 2**32 - 2  # two records short of wrapping
    r = ring_at(memory)
    for i in range(5):
        assert r.push(b"%d" % i)
    assert memory.head == 3 and len(r) == 5
    assert [r.pop() for _ in range(5)] == [b"%d" % i for i in range(5)]
    assert memory.tail == 3


def test_a_record_larger_than_a_slot_is_refused(memory):
    with pytest.raises(ValueError):
        ring_at(memory).push(bytes(MESSAGE_SIZE + 1))


def test_a_corrupt_slot_length_comes_out_too_large_for_the_decoder(memory):
    r = ring_at(memory)
    r.push(b"ok")
    memory.slots[0].length = 2**31
    record = r.pop()
    assert len(record) == MESSAGE_SIZE + 1  # the decoder's "too_large", so it is counted and dropped
    assert memory.tail == 1  # and the ring goes on


def test_the_other_side_is_woken_only_when_it_says_it_waits(memory):
    r = ring_at(memory)
    r.push(b"x")
    assert not r.wake_consumer() and not r.wake_producer()
    memory.consumer_waiting = 1
    assert r.wake_consumer() and not r.wake_producer()
    memory.consumer_waiting, memory.producer_waiting = 0, 1
    assert r.wake_producer() and not r.wake_consumer()


def test_a_consumer_sleeps_only_on_an_empty_ring_and_is_woken(memory):
    r = ring_at(memory)
    started = time.monotonic()
    assert r.wait_for_record(0.02)  # empty: it slept, until the timeout
    assert time.monotonic() - started >= 0.015 and memory.consumer_waiting == 0
    r.push(b"x")
    assert not r.wait_for_record(5.0)  # a record is there: no sleep at all
    r.pop()
    slept = []
    waiter = threading.Thread(target=lambda: slept.append(r.wait_for_record(5.0)))
    waiter.start()
    while not memory.consumer_waiting and waiter.is_alive():  # it says it waits, then sleeps
        time.sleep(0.001)
    started = time.monotonic()
    r.push(b"y")
    assert r.wake_consumer()
    waiter.join(5.0)
    assert slept == [True] and time.monotonic() - started < 1.0  # woken, not timed out


def test_a_producer_sleeps_only_on_a_full_ring(memory):
    r = ring_at(memory)
    started = time.monotonic()
    r.wait_for_space(5.0)
    assert time.monotonic() - started < 1.0  # room: no wait
    for _ in range(RING_SLOTS):
        r.push(b"x")
    r.wait_for_space(0.02)
    assert time.monotonic() - started >= 0.015 and memory.producer_waiting == 0


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
