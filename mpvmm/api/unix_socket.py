"""A listening Unix socket only its owner can reach, whose path goes with it.

The path is bound 0600 (under a umask, so there is no moment when it is
wider), and removed by ``close``. A path left by an mpvmm that was killed
(a socket nobody listens on) is taken over; one a live process listens on,
or that is not a socket, is refused with a UsageError naming the option.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from mpvmm.errors import UsageError

LISTEN_BACKLOG = 16


def _stale(path: str) -> bool:
    """``path`` is a socket nobody listens on any more."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


class PrivateUnixSocket:
    """A socket listening on ``path``, mode 0600, for ``option`` (named in errors)."""

    sock: socket.socket | None = None

    def __init__(self, path: str, option: str):
        self.path = path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as err:
            raise UsageError(f"{option} {path}: {err.strerror}") from err
        if mode is not None:
            if not stat.S_ISSOCK(mode) or not _stale(path):
                raise UsageError(f"{option} {path}: already in use (a live VMM's socket, or not a socket)")
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        previous = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as err:
            sock.close()
            if err.errno == errno.ENAMETOOLONG or isinstance(err, UnicodeError):
                raise UsageError(f"{option} {path}: the path is too long for a Unix socket") from err
            raise UsageError(f"{option} {path}: {err.strerror}") from err
        finally:
            os.umask(previous)
        sock.listen(LISTEN_BACKLOG)
        self.sock = sock

    def close(self) -> None:
        """Close the socket (if still ours) and remove its path. Idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> "PrivateUnixSocket":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
