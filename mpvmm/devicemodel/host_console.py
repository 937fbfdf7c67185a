"""Where the guest's UART output goes: a buffered fd.

The UART hands over one byte per guest write; a syscall per byte would cost
more than the exit that produced it. The process flushes when its loop runs
out of messages, so output still appears promptly.
"""

from __future__ import annotations

import os

# Flushed when the loop is idle, or once this much waits (a guest that never
# lets the loop go idle still gets its output shown, and memory stays bounded).
CONSOLE_FLUSH_BYTES = 4096


class HostConsole:
    """Buffers the UART's output so the loop does not make a syscall per byte."""

    def __init__(self, fd: int, owns_fd: bool):
        self.fd = fd
        self._owns_fd = owns_fd
        self._buffer = bytearray()
        try:
            # A person is watching a terminal: show each line as it completes.
            self._line_buffered = os.isatty(fd)
        except OSError:
            self._line_buffered = False
        self.written_bytes = 0
        self.lost_bytes = 0
        self.write_errors = 0
        self.last_error: str | None = None  # strerror of the latest failed write, for the user

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= CONSOLE_FLUSH_BYTES or (self._line_buffered and b"\n" in data):
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buffer)
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as err:
            # A closed pipe or full disk must not stop the guest: count, drop,
            # and keep why, for the summary, the report and /metrics.
            self.lost_bytes += len(view) - done
            self.write_errors += 1
            self.last_error = err.strerror
        finally:
            self.written_bytes += done
            view.release()
            self._buffer.clear()

    def close(self) -> None:
        self.flush()
        if self._owns_fd:
            os.close(self.fd)

    def stats(self) -> dict[str, int | str | None]:
        return {"written_bytes": self.written_bytes, "lost_bytes": self.lost_bytes,
                "write_errors": self.write_errors, "error": self.last_error}
