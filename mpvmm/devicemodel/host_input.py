"""Host terminal input for the guest's UART, with back-pressure.

The device model polls the terminal fd with its other fds. Bytes are read
only while the UART's 64-byte FIFO has room; when it is full, the fd is
taken out of the poll set (so a level-triggered epoll does not spin) and put
back once the guest has read. End of file or an error stops input for good.
"""

from __future__ import annotations

import os
import select

READ_SIZE = 64


class HostInput:
    def __init__(self, fd: int, uart, epoll: select.epoll):
        self.fd = fd
        self.uart = uart  # replaced when the machine is restored from saved states
        self._epoll = epoll
        self._armed = True
        self.closed = False
        epoll.register(fd, select.EPOLLIN)

    def on_readable(self) -> None:
        room = self.uart.fifo_capacity()
        if room == 0:
            self._arm(False)
            return
        try:
            data = os.read(self.fd, min(room, READ_SIZE))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.uart.enqueue_raw_bytes(data)

    def rearm(self) -> None:
        """After guest accesses: listen again if the FIFO has room."""
        if not self.closed and not self._armed and self.uart.fifo_capacity():
            self._arm(True)

    def _arm(self, on: bool) -> None:
        self._epoll.modify(self.fd, select.EPOLLIN if on else 0)
        self._armed = on

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._epoll.unregister(self.fd)
            except (OSError, ValueError):
                pass
