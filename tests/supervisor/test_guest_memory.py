"""GuestMemory: a private /dev/shm object, mapped, split around the MMIO hole."""

import ctypes
import mmap
import os
import re
import stat

import pytest

from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.x86 import layout

SHM = "/dev/shm"
SIZE = 4 * layout.MIB
LARGE_SIZE = 4 * layout.GIB + 512 * layout.MIB  # 3 GiB below the hole, 1.5 GiB above 4 GiB


def _ours():
    """This process's objects in /dev/shm."""
    prefix = f"mpvmm-{os.getpid()}-"
    return {name for name in os.listdir(SHM) if name.startswith(prefix)}


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def leftovers():
    """Fails the test if it leaves one of our objects in /dev/shm or an open fd."""
    before, fds = _ours(), _open_fds()
    yield
    assert _ours() == before
    assert _open_fds() <= fds


@pytest.fixture
def memory(leftovers):
    memory = GuestMemory(SIZE)
    yield memory
    memory.close()


def _link(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_object_is_private_unguessable_and_nameless(memory):
    # Unlinked the moment it was mapped: reachable only through the fd.
    assert re.fullmatch(rf"/dev/shm/mpvmm-{os.getpid()}-[0-9a-f]{{16}}-ram \(deleted\)", _link(memory.fd))
    assert _ours() == set()
    info = os.fstat(memory.fd)
    assert info.st_nlink == 0
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.getuid()
    assert info.st_size == SIZE


def test_two_memories_get_different_names(leftovers):
    with GuestMemory(SIZE) as first, GuestMemory(SIZE) as second:
        random_part = [_link(m.fd).split("-")[2] for m in (first, second)]
        assert random_part[0] != random_part[1]


def test_write_read_round_trip(memory):
    data = bytes(range(256)) * 4
    memory.write(0x1000, data)
    assert memory.read(0x1000, len(data)) == data
    assert memory.read(0x1000 + len(data), 16) == bytes(16)
    # The bytes are at host_pointer, i.e. in the shared mapping.
    assert ctypes.string_at(memory.host_pointer(0x1000), 4) == data[:4]
    memory.write(SIZE - 4, b"tail")
    assert memory.read(SIZE - 4, 4) == b"tail"


def test_memory_starts_zeroed(memory):
    assert memory.read(0, 4096) == bytes(4096)


def test_view_is_backed_by_guest_memory(memory):
    value = memory.view(0x2000, ctypes.c_uint64)
    value.value = 0x1122334455667788
    assert memory.read(0x2000, 8) == bytes.fromhex("8877665544332211")


def test_small_memory_is_one_region(memory):
    assert memory.regions() == [(0, SIZE, 0)]


def test_host_pointer_refuses_what_is_not_ram(memory):
    with pytest.raises(ValueError, match="not RAM"):
        memory.host_pointer(SIZE)
    with pytest.raises(ValueError, match="not RAM"):
        memory.host_pointer(SIZE - 4, 8)  # straddles the end
    with pytest.raises(ValueError, match="not RAM"):
        memory.host_pointer(layout.MMIO_TESTDEV_ADDR)
    with pytest.raises(ValueError):
        memory.write(SIZE - 1, b"ab")
    with pytest.raises(ValueError):
        memory.read(SIZE, 1)
    assert memory.host_pointer(SIZE - 1) == memory.host_address + SIZE - 1
    assert memory.contains(0, SIZE)
    assert not memory.contains(0, SIZE + 1)


def _shm_free():
    info = os.statvfs(SHM)
    return info.f_bavail * info.f_frsize


@pytest.mark.skipif(_shm_free() < LARGE_SIZE, reason="/dev/shm too small for a sparse 4.5 GiB object")
def test_large_memory_is_split_around_the_mmio_hole(leftovers):
    with GuestMemory(LARGE_SIZE) as memory:
        below = layout.MMIO_HOLE_START
        above = LARGE_SIZE - below
        assert memory.regions() == [(0, below, 0), (layout.MMIO_HOLE_END, above, below)]
        # RAM above the hole sits at host offset 3 GiB in the object.
        address = layout.MMIO_HOLE_END + 0x1000
        memory.write(address, b"high")
        assert memory.host_pointer(address) == memory.host_address + below + 0x1000
        assert ctypes.string_at(memory.host_address + below + 0x1000, 4) == b"high"
        memory.write(below - 4, b"low!")
        assert memory.read(below - 4, 4) == b"low!"
        # The hole and the end are not RAM; nor is a range across the hole.
        for address, length in [
            (layout.MMIO_HOLE_START, 1),
            (layout.MMIO_TESTDEV_ADDR, 4),
            (layout.MMIO_HOLE_END - 1, 1),
            (below - 4, 8),
            (layout.MMIO_HOLE_END + above, 1),
        ]:
            with pytest.raises(ValueError, match="not RAM"):
                memory.host_pointer(address, length)
        assert memory.contains(layout.MMIO_HOLE_END, above)
        assert not memory.contains(layout.MMIO_HOLE_END, above + 1)


def test_exactly_3_gib_is_one_region():
    # regions() is pure arithmetic on size: check the boundary without mapping 3 GiB.
    memory = GuestMemory.__new__(GuestMemory)
    memory.size = layout.MMIO_HOLE_START
    assert memory.regions() == [(0, layout.MMIO_HOLE_START, 0)]
    memory.size = layout.MMIO_HOLE_START + layout.PAGE_SIZE
    assert memory.regions() == [
        (0, layout.MMIO_HOLE_START, 0),
        (layout.MMIO_HOLE_END, layout.PAGE_SIZE, layout.MMIO_HOLE_START),
    ]


def test_the_fd_maps_the_same_memory(memory):
    # What the device model does with the fd it inherits.
    memory.write(0x3000, b"shared")
    with mmap.mmap(memory.fd, SIZE) as other:
        assert other[0x3000:0x3006] == b"shared"
        other[0x4000:0x4005] = b"back!"
    assert memory.read(0x4000, 5) == b"back!"


def test_close_twice_is_fine(leftovers):
    memory = GuestMemory(SIZE)
    fd = memory.fd
    memory.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert memory.host_address == 0 and memory.fd == -1
    memory.close()


def test_close_after_a_failed_constructor(leftovers):
    with pytest.raises(ValueError, match="page size"):
        GuestMemory(SIZE + 1)
    with pytest.raises(ValueError):
        GuestMemory(0)
    GuestMemory.__new__(GuestMemory).close()


def test_context_manager_leaves_nothing_in_dev_shm(leftovers):
    with GuestMemory(SIZE) as memory:
        assert _ours() == set()
        memory.write(0, b"x")
    assert memory.fd == -1
