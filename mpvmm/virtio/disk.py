"""The host side of a virtio-blk disk: a file read and written at offsets, straight into guest RAM.

Reads and writes are ``preadv``/``pwritev`` on memoryviews of guest RAM:
no copy through Python, no file position shared with anyone, and the GIL
released for the syscall. Discard punches holes (``fallocate`` with
``FALLOC_FL_PUNCH_HOLE``), which only some filesystems can do: ``can_punch``
probes it once, harmlessly, by punching past the end of the file.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat

from mpvmm.virtio.faults import DiskError

SECTOR_SIZE = 512  # virtio-blk counts in 512-byte sectors whatever the block size

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# The most buffers one preadv/pwritev takes (Linux's UIO_MAXIOV).
_IOV_MAX = os.sysconf("SC_IOV_MAX")
# Zeroes written this many bytes at a time where fallocate cannot zero a range.
_ZERO_CHUNK = bytes(1 << 20)
# fallocate's answers for "this file or filesystem cannot do that".
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class DiskFile:
    """A regular file or block device as a disk; ``file`` is any object with ``fileno()`` (kept, not closed)."""

    def __init__(self, file, read_only: bool):
        self._file = file
        self.fd = file.fileno()
        self.read_only = read_only
        try:
            mode = os.fstat(self.fd).st_mode
            access = fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as err:
            raise DiskError(f"cannot use the disk file: {err.strerror}") from err
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise DiskError("a disk must be a regular file or a block device")
        if access not in (os.O_RDONLY, os.O_RDWR) or (access == os.O_RDONLY and not read_only):
            raise DiskError("a writable disk's file must be open for reading and writing")
        self.can_punch = not read_only and self._probe_punch()

    def _probe_punch(self) -> bool:
        """Punch a hole past the end of the file: a no-op where holes are supported, an error elsewhere."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self.size, SECTOR_SIZE)
        except OSError:
            return False
        return True

    @property
    def sectors(self) -> int:
        """The capacity: whole sectors only (a partial last sector is not addressable)."""
        return self.size // SECTOR_SIZE

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from the file at ``offset``; OSError on a failure or a short file."""
        _vectored(os.preadv, self.fd, views, offset)

    def write_from(self, views: list[memoryview], offset: int) -> None:
        _vectored(os.pwritev, self.fd, views, offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def punch_hole(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make [offset, offset + length) read as zeroes, freeing the blocks where allowed and possible."""
        if unmap and self.can_punch:
            self.punch_hole(offset, length)
            return
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
        end = offset + length
        while offset < end:
            chunk = memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), end - offset)]
            _vectored(os.pwritev, self.fd, [chunk], offset)
            offset += len(chunk)


def _vectored(call, fd: int, views: list[memoryview], offset: int) -> None:
    """preadv/pwritev all of ``views`` at ``offset``, resuming after short transfers."""
    pending = collections.deque(view for view in views if len(view))
    while pending:
        batch = [pending[i] for i in range(min(len(pending), _IOV_MAX))]
        done = call(fd, batch, offset)
        if done <= 0:
            raise OSError(errno.EIO, "disk file ended before the request did")
        offset += done
        while done:
            first = pending[0]
            if done >= len(first):
                done -= len(first)
                pending.popleft()
            else:
                pending[0] = first[done:]
                done = 0
