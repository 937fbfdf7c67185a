"""The Python mirror of ring.h against the compiled C, and the two sides speaking to each other.

``_runloop.layout()`` reports offsetof/sizeof from the extension, as for the
stats page (tests/vcpu_worker/test_layout.py); ``_runloop.ring_push`` and
``ring_pop`` are ring.h's own functions, so a record pushed by one language
and popped by the other proves they agree on more than offsets.
"""

import ctypes

import pytest

from mpvmm.transport import ring
from mpvmm.transport.ring import MessageRing, MsgRing, RingAreaHeader, RingSlot
from mpvmm.vcpu_worker import _runloop

STRUCTS = {"ring_slot": RingSlot, "msg_ring": MsgRing, "ring_area_header": RingAreaHeader}
PADDING = {"reserved", "producer_pad", "consumer_pad", "pad", "sleeping_pad"}


@pytest.fixture(scope="module")
def layout():
    return _runloop.layout()


@pytest.mark.parametrize("c_name", STRUCTS)
def test_every_field_and_size_matches_the_c(layout, c_name):
    py_struct = STRUCTS[c_name]
    c_fields = {key.split(".", 1)[1] for key in layout if key.startswith(f"{c_name}.")} - {"sizeof"}
    py_fields = {name for name, _ in py_struct._fields_} - PADDING
    assert py_fields == c_fields
    for name in py_fields:
        assert getattr(py_struct, name).offset == layout[f"{c_name}.{name}"], name
    assert ctypes.sizeof(py_struct) == layout[f"{c_name}.sizeof"]


def test_constants_come_from_the_c(layout):
    assert (ring.RING_SLOTS, ring.MESSAGE_SIZE, ring.HEADER_SIZE) == (
        layout["RING_SLOTS"], layout["RING_MESSAGE_SIZE"], layout["RING_HEADER_SIZE"])
    assert ring.AREA_MAGIC.to_bytes(8, "little") == b"MPVMRING"
    assert ring.RING_SLOTS & (ring.RING_SLOTS - 1) == 0  # a power of two: indices wrap cleanly
    assert ctypes.sizeof(RingAreaHeader) <= ring.HEADER_SIZE


def test_the_two_sides_write_on_separate_cache_lines():
    assert MsgRing.head.offset // 64 != MsgRing.tail.offset // 64
    assert MsgRing.slots.offset % 64 == 0 and ctypes.sizeof(MsgRing) % 64 == 0
    assert RingAreaHeader.server_sleeping.offset % 64 == 0


def test_c_pushes_what_python_pops_and_back():
    memory = MsgRing()
    python_side = MessageRing(memory)
    address = ctypes.addressof(memory)
    records = [bytes([i]) * (i % ring.MESSAGE_SIZE + 1) for i in range(3 * ring.RING_SLOTS)]
    for record in records:  # three times round the ring, one record at a time
        assert _runloop.ring_push(address, record)
        assert python_side.pop() == record
        assert python_side.push(record)
        assert _runloop.ring_pop(address) == record
    assert memory.head == memory.tail == 2 * len(records)


def test_c_sees_a_full_ring_where_python_filled_it():
    memory = MsgRing()
    python_side = MessageRing(memory)
    for i in range(ring.RING_SLOTS):
        assert python_side.push(b"%d" % i)
    assert not _runloop.ring_push(ctypes.addressof(memory), b"one too many")
    assert [_runloop.ring_pop(ctypes.addressof(memory)) for _ in range(ring.RING_SLOTS)] == \
        [b"%d" % i for i in range(ring.RING_SLOTS)]
    assert _runloop.ring_pop(ctypes.addressof(memory)) is None


def test_c_refuses_a_slot_with_an_impossible_length():
    memory = MsgRing()
    MessageRing(memory).push(b"x")
    memory.slots[0].length = ring.MESSAGE_SIZE + 7  # corrupt
    with pytest.raises(ValueError, match="impossible length"):
        _runloop.ring_pop(ctypes.addressof(memory))
    assert memory.tail == 1  # dropped, not stuck
