"""GuestRam: guest-physical access over a buffer, never outside the RAM regions."""

import mmap
import os

import pytest

from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.virtio.faults import GuestMemoryError
from mpvmm.virtio.memory import GuestRam
from tests.virtio.driver import HIGH_RAM_ADDR, HIGH_RAM_SIZE, LOW_RAM_SIZE, make_ram


def test_reads_and_writes_land_at_the_region_offset():
    buffer, ram = make_ram()
    ram.write(0x10, b"low")
    ram.write(HIGH_RAM_ADDR + 4, b"high")
    assert buffer[0x10:0x13] == b"low"
    # The high region starts LOW_RAM_SIZE bytes into the buffer, whatever its guest address.
    assert buffer[LOW_RAM_SIZE + 4 : LOW_RAM_SIZE + 8] == b"high"
    assert ram.read(HIGH_RAM_ADDR + 4, 4) == b"high"
    ram.write_u16(0x20, 0xBEEF)
    ram.write_u32(0x24, 0xDEADBEEF)
    assert (ram.read_u16(0x20), ram.read_u32(0x24)) == (0xBEEF, 0xDEADBEEF)
    ram.write(0x30, (0x1122334455667788).to_bytes(8, "little"))
    assert ram.read_u64(0x30) == 0x1122334455667788


@pytest.mark.parametrize(
    "address, length",
    [
        (LOW_RAM_SIZE - 1, 4),  # runs off the low region into the hole
        (LOW_RAM_SIZE, 1),  # the first byte of the hole
        (HIGH_RAM_ADDR - 1, 2),  # from the hole into the high region
        (HIGH_RAM_ADDR + HIGH_RAM_SIZE - 1, 2),  # off the end of RAM
        (HIGH_RAM_ADDR + HIGH_RAM_SIZE, 1),
        (2**64 - 1, 1),
        (-1, 1),
    ],
)
def test_nothing_outside_ram_is_reachable(address, length):
    buffer, ram = make_ram()
    before = bytes(buffer)
    assert not ram.contains(address, length)
    for access in (
        lambda: ram.read(address, length),
        lambda: ram.write(address, b"x" * length),
        lambda: ram.views(address, length, writing=True),
        lambda: ram.write_u16(address, 1),
        lambda: ram.read_u16(address),
    ):
        with pytest.raises(GuestMemoryError):
            access()
    assert bytes(buffer) == before


def test_edges_of_regions():
    _, ram = make_ram()
    assert ram.contains(0, LOW_RAM_SIZE)
    assert ram.contains(LOW_RAM_SIZE - 1, 1)
    assert ram.contains(HIGH_RAM_ADDR, HIGH_RAM_SIZE)
    # A zero-length range is fine at a region's end, not inside the hole.
    assert ram.contains(LOW_RAM_SIZE, 0)
    assert not ram.contains(LOW_RAM_SIZE + 1, 0)
    assert ram.read(LOW_RAM_SIZE, 0) == b""


def test_a_range_may_cross_contiguous_regions_but_not_a_hole():
    buffer = bytearray(0x3000)
    # Guest [0x1000, 0x2000) lives at buffer 0x2000 and [0x2000, 0x3000) at 0: contiguous in the guest only.
    ram = GuestRam(buffer, [(0x2000, 0x1000, 0), (0x1000, 0x1000, 0x2000)])
    ram.write(0x1FFE, b"abcd")
    assert buffer[0x2FFE:0x3000] == b"ab" and buffer[0:2] == b"cd"
    assert ram.read(0x1FFE, 4) == b"abcd"
    assert [bytes(v) for v in ram.views(0x1FFE, 4, writing=False)] == [b"ab", b"cd"]
    with pytest.raises(GuestMemoryError):
        ram.read(0x2FFF, 2)


@pytest.mark.parametrize(
    "regions",
    [
        [(0, 0x2000, 0)],  # past the buffer
        [(0, 0x800, 0), (0x400, 0x400, 0x800)],  # overlapping in the guest
        [(0, 0, 0)],  # empty
        [(0, 0x100, -1)],
    ],
)
def test_bad_region_lists_are_refused(regions):
    with pytest.raises(ValueError):
        GuestRam(bytearray(0x1000), regions)


def test_read_only_buffers_are_refused():
    with pytest.raises(ValueError):
        GuestRam(bytes(16), [(0, 16, 0)])


def test_closed_ram_refuses_access_and_releases_the_mmap():
    mapping = mmap.mmap(-1, 4096)
    ram = GuestRam.flat(mapping)
    ram.write(0, b"x")
    ram.close()
    ram.close()
    with pytest.raises(GuestMemoryError):
        ram.read(0, 1)
    mapping.close()  # would raise BufferError if the view were still exported


def test_over_the_supervisors_shared_guest_memory():
    """A device process maps the supervisor's guest-RAM fd and uses its regions: both see the same bytes."""
    with GuestMemory(1 << 20) as guest:
        mapping = mmap.mmap(os.dup(guest.fd), guest.size)
        ram = GuestRam(mapping, guest.regions())
        try:
            ram.write(0x8000, b"from the device")
            assert guest.read(0x8000, 15) == b"from the device"
            guest.write(0x9000, b"from the supervisor")
            assert ram.read(0x9000, 19) == b"from the supervisor"
            assert not ram.contains(guest.size - 4, 8)
        finally:
            ram.close()
            mapping.close()
