"""The Python mirror of ring.h against the compiled C, and the two sides speaking to each other.

``_runloop.layout()`` reports offsetof/sizeof from the extension, as for the
stats page (tests/vcpu_worker/test_layout.py); records pushed by ring.h are
read back through the ctypes mirror and the other way round, so the two
agree on more than offsets.
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


def test_records_sit_where_the_python_layout_says():
    """ring.h fills the slots and indices the ctypes mirror reads, and reads what it writes."""
    memory = MsgRing()
    r = MessageRing(ctypes.addressof(memory))
    for i in range(3 * ring.RING_SLOTS):  # three times round the ring
        record = bytes([i % 256]) * (i % ring.MESSAGE_SIZE + 1)
        assert r.push(record)
        slot = memory.slots[i % ring.RING_SLOTS]
        assert (slot.length, bytes(slot.data[:slot.length])) == (len(record), record)
        assert memory.head == i + 1 and memory.tail == i
        slot.data[0] ^= 0xFF  # what ctypes writes, the C pop reads
        assert r.pop() == bytes([record[0] ^ 0xFF]) + record[1:]
    assert memory.head == memory.tail == 3 * ring.RING_SLOTS
