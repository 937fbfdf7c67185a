"""Guest RAM as the virtio core sees it: bounds-checked access at guest-physical addresses.

A ``GuestRam`` lays RAM regions (guest address, size, offset into a buffer)
over one writable buffer: a bytearray in tests, an mmap of the guest-RAM
shared memory object in a device process. The regions are those of
``mpvmm.supervisor.guest_memory.GuestMemory.regions()``: RAM from 0 to the MMIO hole
and the rest above 4 GiB, so guest RAM has a hole the core must never step into.

Every access goes through ``_pieces``, which resolves a guest range to buffer
ranges or raises ``GuestMemoryError``: no read or write can land outside RAM,
whatever address a guest writes into a descriptor. A range may cross from one
region into the next only where the two are contiguous in guest-physical space.
"""

from __future__ import annotations

import bisect
import struct
import threading
from typing import NamedTuple, Sequence

from mpvmm.virtio.faults import GuestMemoryError
from mpvmm.x86.layout import GuestAddress

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class RamRegion(NamedTuple):
    """One contiguous range of guest RAM and where it sits in the buffer."""

    guest_address: GuestAddress
    size: int
    offset: int  # into the backing buffer, never a guest address

    @property
    def end(self) -> int:
        return self.guest_address + self.size


class GuestRam:
    """Guest RAM over ``buffer``; ``regions`` are (guest address, size, buffer offset) triples."""

    _view: memoryview | None = None  # class-level default: close() works after a failed constructor

    def __init__(self, buffer, regions: Sequence[tuple[int, int, int]]):
        view = memoryview(buffer).cast("B")
        if view.readonly:
            view.release()
            raise ValueError("guest RAM must be a writable buffer")
        ordered = sorted(RamRegion(GuestAddress(a), s, o) for a, s, o in regions)
        try:
            _check_regions(ordered, len(view))
        except ValueError:
            view.release()
            raise
        # Ring indexes are stored through this one: a single 16-bit store.
        # struct.pack_into zero-fills its field before writing it, so the
        # driver could see a used index of 0 for a moment (it did: the
        # built-in guest's polling driver read 0 and ran 65536 entries on).
        self._words = view[: len(view) & ~1].cast("H")
        self._view = view
        self._regions = ordered
        # The hot path (every ring and descriptor access) looks regions up in these.
        self._starts = [region.guest_address for region in ordered]
        self._ends = [region.end for region in ordered]
        self._offsets = [region.offset for region in ordered]
        # A lock's acquire and release are locked instructions: on x86 a full
        # barrier, the only one pure Python can reach (see fence()).
        self._fence_lock = threading.Lock()

    @classmethod
    def flat(cls, buffer) -> GuestRam:
        """RAM from guest address 0 covering all of ``buffer``."""
        return cls(buffer, [(0, len(memoryview(buffer).cast("B")), 0)])

    def regions(self) -> list[RamRegion]:
        return list(self._regions)

    # --- Bounds. ---

    def contains(self, address: int, length: int) -> bool:
        """Whether [address, address + length) is all RAM (a zero length: address is in or just past RAM)."""
        try:
            self._resolve(address, length)
        except GuestMemoryError:
            return False
        return True

    def _resolve(self, address: int, length: int) -> list[tuple[int, int]]:
        """The (buffer offset, size) pieces of a guest range, or GuestMemoryError."""
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or address < 0 or length < 0 or address > self._ends[index]:
            raise GuestMemoryError(f"guest range {address:#x}+{length:#x} is not RAM")
        if address + length <= self._ends[index]:  # the common case: one region
            return [(self._offsets[index] + address - self._starts[index], length)] if length else []
        pieces = []
        position, remaining = address, length
        while remaining:
            if index >= len(self._regions) or self._regions[index].guest_address > position:
                raise GuestMemoryError(f"guest range {address:#x}+{length:#x} runs out of RAM at {position:#x}")
            region = self._regions[index]
            size = min(remaining, region.end - position)
            if size:
                pieces.append((region.offset + position - region.guest_address, size))
            position += size
            remaining -= size
            index += 1
        return pieces

    def _pieces(self, address: int, length: int, writing: bool) -> list[tuple[int, int]]:
        """The one gate every access passes (tests instrument it); ``writing`` says which way."""
        if self._view is None:
            raise GuestMemoryError("guest RAM is closed")
        return self._resolve(address, length)

    # --- Access. ---

    def read(self, address: int, length: int) -> bytes:
        pieces = self._pieces(address, length, writing=False)
        if len(pieces) == 1:
            offset, size = pieces[0]
            return bytes(self._view[offset : offset + size])
        return b"".join(bytes(self._view[offset : offset + size]) for offset, size in pieces)

    def write(self, address: int, data: bytes) -> None:
        position = 0
        for offset, size in self._pieces(address, len(data), writing=True):
            self._view[offset : offset + size] = data[position : position + size]
            position += size

    def views(self, address: int, length: int, writing: bool) -> list[memoryview]:
        """Memoryviews straight onto guest RAM for [address, address + length), one per region crossed.

        For zero-copy I/O (``os.preadv`` into guest buffers). Release them
        promptly: an mmap cannot be closed while a view of it lives.
        """
        return [self._view[offset : offset + size] for offset, size in self._pieces(address, length, writing)]

    def read_u16(self, address: int) -> int:
        return _U16.unpack_from(self._view, self._one_piece(address, 2, False))[0]

    def read_u32(self, address: int) -> int:
        return _U32.unpack_from(self._view, self._one_piece(address, 4, False))[0]

    def read_u64(self, address: int) -> int:
        return _U64.unpack_from(self._view, self._one_piece(address, 8, False))[0]

    def write_u16(self, address: int, value: int) -> None:
        """One store of the whole field (a ring index the driver may be reading right now)."""
        offset = self._one_piece(address, 2, True)
        if offset % 2:
            raise GuestMemoryError(f"guest field {address:#x}+2 is not 2-byte aligned")
        self._words[offset >> 1] = value

    def write_u32(self, address: int, value: int) -> None:
        _U32.pack_into(self._view, self._one_piece(address, 4, True), value)

    def _one_piece(self, address: int, length: int, writing: bool) -> int:
        pieces = self._pieces(address, length, writing)
        if len(pieces) != 1:
            # A ring field split across two regions: only possible for
            # unaligned fields, and rings are checked to be aligned.
            raise GuestMemoryError(f"guest field {address:#x}+{length} crosses a RAM region boundary")
        return pieces[0][0]

    def fence(self) -> None:
        """A full memory barrier between our stores and later loads (x86 reorders only those).

        The EVENT_IDX protocol needs one: the device publishes its used index,
        then reads the driver's used_event, while the driver does the mirror
        image; without a barrier each side can read the other's stale value and
        both wait. An uncontended lock acquire and release are ``lock``-prefixed
        instructions (glibc's semaphore or CPython's mutex fast path).
        """
        with self._fence_lock:
            pass

    def close(self) -> None:
        """Release the buffer (so an mmap under it can be closed). Safe to call twice."""
        if self._view is not None:
            self._words.release()
            self._view.release()
            self._view = None


def _check_regions(regions: list[RamRegion], buffer_size: int) -> None:
    for region in regions:
        if region.guest_address < 0 or region.size <= 0 or region.offset < 0:
            raise ValueError(f"bad RAM region {region}")
        if region.offset + region.size > buffer_size:
            raise ValueError(f"RAM region {region} runs past the {buffer_size}-byte buffer")
    for first, second in zip(regions, regions[1:]):
        if second.guest_address < first.end:
            raise ValueError(f"RAM regions {first} and {second} overlap")
