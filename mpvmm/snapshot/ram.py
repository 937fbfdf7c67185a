"""Guest RAM as runs of pages that hold something: what a snapshot writes and a migration sends.

Most of a guest's RAM is zeros: pages it never touched are holes in its
shared memory object (tmpfs answers SEEK_DATA/SEEK_HOLE), and pages it
zeroed compare equal to a page of zeros. ``data_runs`` walks the data
extents and skips both, so a snapshot's memory file is sparse (zero pages
are never written) and a migration never sends them. The same walk over a
snapshot's memory file gives the same runs, which is what its checksum
covers (``runs_checksum``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator

from mpvmm.snapshot import records
from mpvmm.x86.layout import PAGE_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_libc.memcmp.restype = ctypes.c_int
SCAN_CHUNK = 64 * 1024  # compared whole first: most chunks of a guest's RAM are all zeros or all not
MAX_RUN = 4 << 20  # a run is cut here: one PAGES record, one write
_ZEROS = ctypes.create_string_buffer(SCAN_CHUNK)


def is_zero(address: int, length: int) -> bool:
    return _libc.memcmp(address, _ZEROS, length) == 0


def view(address: int, length: int) -> memoryview:
    """The bytes at a host address, without a copy (the mapping must outlive the view)."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each data extent of ``fd`` below ``size``."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return  # nothing but a hole from here on
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _nonzero_runs(address: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    run_start = None
    for chunk in range(start, end, SCAN_CHUNK):
        chunk_end = min(chunk + SCAN_CHUNK, end)
        zero_chunk = is_zero(address + chunk, chunk_end - chunk)
        for page in range(chunk, chunk_end, PAGE_SIZE):
            if zero_chunk or is_zero(address + page, PAGE_SIZE):
                if run_start is not None:
                    yield run_start, page - run_start
                    run_start = None
                if zero_chunk:
                    break
            elif run_start is None:
                run_start = page
            elif page - run_start >= MAX_RUN:
                yield run_start, page - run_start
                run_start = page
    if run_start is not None:
        yield run_start, end - run_start


def data_runs(fd: int, address: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each run of pages that are not all zeros, in order, at most MAX_RUN each.

    ``fd`` is mapped at ``address`` for ``size`` bytes (a multiple of the page size).
    """
    for start, end in _extents(fd, size):
        yield from _nonzero_runs(address, start - start % PAGE_SIZE, -(-end // PAGE_SIZE) * PAGE_SIZE)


def runs_checksum(runs, address: int, checksum: int = 0) -> int:
    """CRC-32 of every run's offset (u64) and bytes, in order: RAM's content, zero pages aside."""
    for offset, length in runs:
        checksum = records.crc32(records.PAGE_OFFSET.pack(offset), checksum)
        checksum = records.crc32(view(address + offset, length), checksum)
    return checksum
