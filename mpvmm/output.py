"""Where mpvmm's own output goes: standard streams that never raise, files replaced whole.

A run's output can fail: stdout closed (``>&-``) or a pipe whose reader
left (``| head``), a full disk under ``--report``. None of that may stop
the VM from being stopped cleanly or the report from being written, and
none of it may end in a traceback. So the summary goes through
``GuardedStream``, which keeps the first error for the status line instead
of raising, the status line through ``say``, and files are written by ``write_atomically``,
so a reader never sees half a report and a failed run leaves none.
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys


def open_standard_fds() -> None:
    """Occupy fds 0, 1 and 2 where they are closed, before anything else is opened.

    A closed stdout would otherwise be the number the next open() gets: KVM's
    fd, or the device model's control socket, which the device model would
    then take for its console. A closed stream stays one that fails: /dev/null
    opened read-only makes every write fail with EBADF, as on the closed fd.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # open() takes the lowest free number: this one, as every lower one
            # is open by now. Inheritable, as a standard stream is: a child
            # (the device model, with fd 1 as its console) gets the same.
            os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)


class GuardedStream(io.TextIOBase):
    """A text stream onto ``fd`` whose writes never raise.

    The first failure is kept in ``error``; later writes are dropped. rich
    writes to it as to any file (``isatty`` answers for the fd, so colours
    still reach a terminal).
    """

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is None:
            data = memoryview(text.encode("utf-8", errors="replace"))
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError as err:
                self.error = err
        return len(text)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False

    def fileno(self) -> int:
        return self.fd


def say(line: str) -> None:
    """One line of mpvmm's own on stderr; a closed or broken stderr loses it, nothing more."""
    stream = sys.stderr  # None when fd 2 was closed as the interpreter started
    if stream is not None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass


# Names of a file some process already has open: written in place, never renamed over.
_OPEN_FILE_NAME = re.compile(r"^/(dev/(stdin|stdout|stderr|fd/\d+)|proc/[^/]+/fd/\d+)$")


def names_an_open_file(path: str) -> bool:
    """Whether ``path`` is, or links through, a name like /dev/stdout or /proc/self/fd/1."""
    path = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if _OPEN_FILE_NAME.match(path):
            return True
        if not os.path.islink(path):
            return False
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
    return False


def write_atomically(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a reader sees the old file or the whole new one.

    The data goes to a temporary file in the same folder (a rename never
    crosses file systems), is flushed to disk, then renamed over the path. A
    link is followed, so the link stays and its target is replaced. What
    cannot be renamed over is appended to instead: a device or a pipe, and a
    file named through an open descriptor (``--report /dev/stdout``, where
    a rename would take the file away from the shell that redirected it). On
    failure the temporary file is removed and the error raised.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if (mode is not None and not stat.S_ISREG(mode)) or names_an_open_file(path):
        with open(path, "ab") as stream:
            stream.write(data)
        return
    folder, name = os.path.split(os.path.realpath(path))
    # os.urandom, not the secrets module: that loads OpenSSL, whose exit
    # handler makes a syscall (futex) the device model's filter refuses.
    temporary = os.path.join(folder, f".{name}.{os.urandom(4).hex()}.tmp")
    try:
        # An existing file keeps its permissions; a new one gets the umask's, like open().
        write_new_file(temporary, data, stat.S_IMODE(mode) if mode is not None else 0o666)
        os.rename(temporary, os.path.join(folder, name))
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) holding ``data``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
