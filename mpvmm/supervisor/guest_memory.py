"""Guest RAM: one POSIX shared memory object, mapped into every process that needs it.

The object is created 0600 under an unguessable name and unlinked the
moment it is mapped: from then on it is reachable only through its file
descriptor (``fd``), which the device model inherits, so there is no window
in which a SIGKILL of the supervisor could leave a name in /dev/shm, and no
unrelated process can ever open it. RAM runs from guest address 0 up to the MMIO hole at 3 GiB;
the rest of it sits above 4 GiB, as on a PC.
"""

import ctypes
import ctypes.util
import mmap
import os
import secrets

import posix_ipc

from mpvmm.errors import HostLimitError, MpvmmError
from mpvmm.x86 import layout

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_DONTDUMP = 16


def map_shared(fd: int, size: int, writable: bool = True) -> int:
    """mmap ``size`` bytes of ``fd`` (or anonymous memory for -1), shared; returns the address.

    Mapped through libc rather than the mmap module so that the address is a
    plain integer KVM and the C run loop can be given, with no buffer export
    pinning the mapping.
    """
    flags = mmap.MAP_SHARED | (mmap.MAP_ANONYMOUS if fd < 0 else 0)
    protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    address = _libc.mmap(None, size, protection, flags, fd, 0)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise MpvmmError(f"cannot map {size} bytes of shared memory: {os.strerror(err)}")
    return address


def unmap(address: int, size: int) -> None:
    _libc.munmap(address, size)


def unique_name(role: str) -> str:
    """A POSIX IPC name no other process can guess: pid plus 64 random bits."""
    return f"/mpvmm-{os.getpid()}-{secrets.token_hex(8)}-{role}"


class GuestMemory:
    """Guest RAM as a POSIX shared memory object mapped at ``host_address``.

    ``GuestMemory(size)`` creates a new object; ``GuestMemory.adopt(fd,
    size)`` maps one another VMM passed over a Unix socket (a local
    migration), so both map the same pages.
    """

    # Class-level defaults: close() works even after a failed constructor.
    host_address = 0
    size = 0
    fd = -1  # the object's file descriptor: the only way to it, as it has no name

    def __init__(self, size: int, *, _fd: int | None = None):
        if size <= 0 or size % layout.PAGE_SIZE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of the page size")
        if _fd is None:
            try:
                shm = posix_ipc.SharedMemory(unique_name("ram"), posix_ipc.O_CREX, mode=0o600, size=size)
            except (posix_ipc.Error, OSError) as err:
                raise HostLimitError(f"cannot create {size} bytes of guest memory in /dev/shm: {err}") from err
            # Nameless from here on: the fd (passed to the device model) is the only way in.
            shm.unlink()
            _fd = shm.fd  # ours to close from here: posix_ipc never closes it by itself
        self.fd = _fd
        try:
            self.host_address = map_shared(self.fd, size)
        except MpvmmError:
            self.close()
            raise
        self.size = size
        # Guest RAM in a core dump of the supervisor would only bloat it.
        _libc.madvise(self.host_address, size, _MADV_DONTDUMP)

    @classmethod
    def adopt(cls, fd: int, size: int) -> "GuestMemory":
        """Map guest RAM another process created (``fd`` becomes ours, closed with it)."""
        try:
            actual = os.fstat(fd).st_size
        except OSError as err:
            os.close(fd)
            raise MpvmmError(f"the guest RAM fd received is unusable: {err.strerror}") from err
        if actual != size:
            os.close(fd)
            raise MpvmmError(f"the guest RAM received holds {actual} bytes, not the {size} announced")
        return cls(size, _fd=fd)

    # --- The guest-physical view. ---

    def regions(self) -> list[tuple[layout.GuestAddress, int, int]]:
        """(guest address, size, host offset) of each RAM range, for the memslots."""
        low = min(self.size, layout.MMIO_HOLE_START)
        regions = [(layout.GuestAddress(0), low, 0)]
        if self.size > low:
            regions.append((layout.MMIO_HOLE_END, self.size - low, low))
        return regions

    def contains(self, address: int, length: int) -> bool:
        return any(start <= address and address + length <= start + size for start, size, _ in self.regions())

    def host_pointer(self, address: int, length: int = 1) -> int:
        """The host address of guest ``address``; the range must be inside one region."""
        for start, size, offset in self.regions():
            if start <= address and address + length <= start + size:
                return self.host_address + offset + (address - start)
        raise ValueError(f"guest range {address:#x}+{length:#x} is not RAM")

    def write(self, address: int, data: bytes) -> None:
        if data:
            ctypes.memmove(self.host_pointer(address, len(data)), data, len(data))

    def read(self, address: int, length: int) -> bytes:
        return ctypes.string_at(self.host_pointer(address, length), length)

    def view(self, address: int, ctype):
        """A ctypes object of type ``ctype`` living in guest RAM at ``address``."""
        return ctype.from_address(self.host_pointer(address, ctypes.sizeof(ctype)))

    # --- Lifetime. ---

    def close(self) -> None:
        """Unmap and close the fd. Safe to call twice and after a failed constructor."""
        if self.host_address:
            unmap(self.host_address, self.size)
            self.host_address = 0
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
