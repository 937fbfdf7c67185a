"""The host terminal in raw mode while a Linux guest owns the console.

Raw, so that keys reach the guest's UART one by one without echo; ISIG
stays on, so Ctrl-C still stops the VM through SIGINT like every other
mpvmm run. Only a tty is touched, and the saved mode comes back on every
exit path (an ExitStack callback, so errors and signals included).
"""

from __future__ import annotations

import os
import sys
import termios
import tty


def stdin_terminal() -> int | None:
    """fd 0 when it is a terminal: only then does a guest get host input."""
    try:
        return sys.stdin.fileno() if sys.stdin is not None and os.isatty(sys.stdin.fileno()) else None
    except (OSError, ValueError):
        return None


class RawTerminal:
    """``fd`` in raw mode while the block runs; nothing happens for None or a non-terminal."""

    def __init__(self, fd: int | None):
        self.fd = fd
        self._saved = None

    def __enter__(self) -> "RawTerminal":
        if self.fd is not None and os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSANOW)
            mode = termios.tcgetattr(self.fd)
            mode[3] |= termios.ISIG  # lflag: keep Ctrl-C as SIGINT
            mode[1] |= termios.OPOST | termios.ONLCR  # oflag: the summary still prints normally
            termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        return self

    @property
    def active(self) -> bool:
        return self._saved is not None

    @property
    def input_fd(self) -> int | None:
        """The terminal the guest reads while raw mode is on; None otherwise."""
        return self.fd if self.active else None

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSAFLUSH, self._saved)
            self._saved = None
