"""Descriptor chains: every rule a guest can break is caught before a byte of the chain is used."""

import mmap

import pytest

from mpvmm.virtio import descriptors, spec
from mpvmm.virtio.descriptors import Segment, walk_chain
from mpvmm.virtio.faults import VirtqueueError
from mpvmm.virtio.memory import GuestRam
from mpvmm.x86 import layout
from tests.virtio.driver import HIGH_RAM_ADDR, HIGH_RAM_SIZE, LOW_RAM_SIZE, make_ram, write_descriptor

NEXT, WRITE, INDIRECT = spec.VIRTQ_DESC_F_NEXT, spec.VIRTQ_DESC_F_WRITE, spec.VIRTQ_DESC_F_INDIRECT
TABLE = 0x1000
INDIRECT_TABLE = 0x2000
SIZE = 8
# Linux's MAP_NORESERVE; the mmap module names it only from Python 3.12.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def table(ram, entries, at=TABLE):
    """Write (addr, len, flags, next) descriptors at ``at``."""
    for i, entry in enumerate(entries):
        write_descriptor(ram, at + 16 * i, *entry)


def walk(ram, head=0, indirect=True, size=SIZE):
    return walk_chain(ram, TABLE, size, head, indirect)


def test_a_chain_splits_into_readable_then_writable_buffers():
    _, ram = make_ram()
    table(ram, [(0x5000, 16, NEXT, 3), (0, 0, 0, 0), (0, 0, 0, 0), (0x6000, 512, NEXT | WRITE, 4), (0x7000, 1, WRITE, 0)])
    chain = walk(ram)
    assert chain.head == 0
    assert chain.readable == [Segment(0x5000, 16)]
    assert chain.writable == [Segment(0x6000, 512), Segment(0x7000, 1)]
    assert (chain.readable_length, chain.writable_length, chain.descriptor_count) == (16, 513, 3)


def test_chain_byte_offsets_span_buffers():
    _, ram = make_ram()
    ram.write(0x5000, b"abc")
    ram.write(0x5100, b"defg")
    table(ram, [(0x5000, 3, NEXT, 1), (0x5100, 4, NEXT, 2), (0x6000, 2, NEXT | WRITE, 3), (0x6100, 2, WRITE, 0)])
    chain = walk(ram)
    assert chain.read(ram, 1, 5) == b"bcdef"
    chain.write(ram, 1, b"XYZ")
    assert ram.read(0x6001, 1) == b"X" and ram.read(0x6100, 2) == b"YZ"
    assert chain.writable_segments(1, 2) == [Segment(0x6001, 1), Segment(0x6100, 1)]
    with pytest.raises(ValueError):
        chain.readable_segments(0, 8)


def test_direct_then_indirect_descriptors():
    """The spec lets a chain end in one indirect descriptor after direct ones (spec 2.7.5.3.2)."""
    _, ram = make_ram()
    table(ram, [(0x5000, 16, NEXT, 1), (INDIRECT_TABLE, 32, INDIRECT | WRITE, 0)])
    table(ram, [(0x5100, 8, NEXT, 1), (0x6000, 4, WRITE, 0)], at=INDIRECT_TABLE)
    chain = walk(ram)
    # The WRITE flag on the descriptor pointing at the table is ignored, as the spec requires.
    assert chain.readable == [Segment(0x5000, 16), Segment(0x5100, 8)]
    assert chain.writable == [Segment(0x6000, 4)]


def bad(ram, match, **kwargs):
    with pytest.raises(VirtqueueError, match=match):
        walk(ram, **kwargs)


def test_head_outside_the_table():
    _, ram = make_ram()
    bad(ram, "head index 8", head=SIZE)


def test_next_outside_the_table():
    _, ram = make_ram()
    table(ram, [(0x5000, 4, NEXT, SIZE)])
    bad(ram, "next index 8")


@pytest.mark.parametrize(
    "address, length",
    [
        (LOW_RAM_SIZE - 4, 8),  # into the hole
        (LOW_RAM_SIZE + 4096, 0),  # a zero-length buffer in the hole
        (HIGH_RAM_ADDR - 2, 4),  # from the hole into high RAM
        (HIGH_RAM_ADDR + HIGH_RAM_SIZE - 1, 2),  # past the end of RAM
        (2**64 - 16, 0xFFFFFFFF),  # wraps around 64 bits in C
        (layout.MMIO_HOLE_START, 16),  # device MMIO, not RAM
    ],
)
def test_buffers_outside_ram(address, length):
    _, ram = make_ram()
    table(ram, [(0x5000, 4, NEXT, 1), (address, length, WRITE, 0)])
    bad(ram, "not guest RAM")


def test_buffers_at_the_edges_of_ram_are_fine():
    _, ram = make_ram()
    table(ram, [(LOW_RAM_SIZE - 8, 8, NEXT, 1), (HIGH_RAM_ADDR, 1, NEXT | WRITE, 2), (HIGH_RAM_ADDR + HIGH_RAM_SIZE - 8, 8, WRITE, 0)])
    assert walk(ram).writable_length == 9


@pytest.mark.parametrize("loop", [[(0x5000, 1, NEXT, 0)], [(0x5000, 1, NEXT, 1), (0x5000, 1, NEXT, 0)]])
def test_loops_end_as_too_long(loop):
    _, ram = make_ram()
    table(ram, loop)
    bad(ram, "longer than its 8-entry table")


def test_a_loop_inside_an_indirect_table():
    _, ram = make_ram()
    table(ram, [(INDIRECT_TABLE, 48, INDIRECT, 0)])
    table(ram, [(0x5000, 1, NEXT, 1), (0x5000, 1, NEXT, 2), (0x5000, 1, NEXT, 0)], at=INDIRECT_TABLE)
    bad(ram, "longer than its 3-entry table")


def test_a_chain_as_long_as_the_queue_is_fine():
    _, ram = make_ram()
    table(ram, [(0x5000, 1, NEXT, i + 1) for i in range(SIZE - 1)] + [(0x5000, 1, 0, 0)])
    assert walk(ram).descriptor_count == SIZE


def test_readable_after_writable():
    _, ram = make_ram()
    table(ram, [(0x5000, 4, NEXT | WRITE, 1), (0x5100, 4, 0, 0)])
    bad(ram, "readable buffer after a writable")


@pytest.mark.parametrize(
    "entry, match",
    [
        ((INDIRECT_TABLE, 24, INDIRECT, 0), "not a non-zero multiple of 16"),
        ((INDIRECT_TABLE, 0, INDIRECT, 0), "not a non-zero multiple of 16"),
        ((INDIRECT_TABLE, 16, INDIRECT | NEXT, 1), "with NEXT set"),
        ((INDIRECT_TABLE, 16 * 1025, INDIRECT, 0), "over the 1024 limit"),
        ((LOW_RAM_SIZE - 16, 32, INDIRECT, 0), "indirect table .* is not guest RAM"),
    ],
)
def test_bad_indirect_descriptors(entry, match):
    _, ram = make_ram()
    table(ram, [entry, (0x5000, 1, 0, 0)])
    table(ram, [(0x5000, 1, 0, 0)], at=INDIRECT_TABLE)
    bad(ram, match)


def test_nested_indirect():
    _, ram = make_ram()
    table(ram, [(INDIRECT_TABLE, 16, INDIRECT, 0)])
    table(ram, [(INDIRECT_TABLE, 16, INDIRECT, 0)], at=INDIRECT_TABLE)
    bad(ram, "inside an indirect table")


def test_indirect_without_the_feature():
    _, ram = make_ram()
    table(ram, [(INDIRECT_TABLE, 16, INDIRECT, 0)])
    table(ram, [(0x5000, 1, 0, 0)], at=INDIRECT_TABLE)
    bad(ram, "without VIRTIO_RING_F_INDIRECT_DESC", indirect=False)


@pytest.fixture
def big_ram():
    """A 4 GiB guest laid out as the supervisor lays it: 3 GiB low, the hole, 1 GiB above 4 GiB.

    The mapping is sparse (MAP_NORESERVE): only the pages a test touches exist.
    """
    size = 4 << 30
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    regions = [(0, 3 << 30, 0), (layout.MMIO_HOLE_END, 1 << 30, 3 << 30)]
    ram = GuestRam(mapping, regions)
    yield ram
    ram.close()
    mapping.close()


def test_huge_buffers_inside_ram_are_fine_up_to_the_32_bit_total(big_ram):
    # All of low RAM, then all of high RAM but its last byte: 2**32 - 1 bytes.
    table(big_ram, [(0, 3 << 30, NEXT, 1), (layout.MMIO_HOLE_END, (1 << 30) - 1, WRITE, 0)])
    chain = walk(big_ram)
    assert chain.readable_length + chain.writable_length == 0xFFFFFFFF


def test_a_chain_over_4_gib_in_total(big_ram):
    """Each buffer is RAM, but together they pass the used ring's 32-bit length (spec: at most 2**32 bytes)."""
    table(big_ram, [(0, 3 << 30, NEXT, 1), (layout.MMIO_HOLE_END, 1 << 30, WRITE, 0)])
    bad(big_ram, "longer than 2\\*\\*32 bytes")
    assert descriptors.MAX_CHAIN_BYTES == 0xFFFFFFFF
