"""Host terminal input for the guest's UART, read whatever the guest does.

The device model polls the terminal fd with its other fds and reads it
whenever it is readable, even while the UART's 64-byte FIFO is full. It
must: the kernel's line discipline sees Ctrl-C (and sends SIGINT, which
stops the VM) only as it takes typed input in, and it stops taking input
once 4 KiB wait unread in its buffer. Reading only while the FIFO had
room left Ctrl-C dead behind about 4 KB of typing a guest had not read.

What the FIFO cannot take yet waits here, up to PENDING_MAX bytes, and
moves into the FIFO as the guest reads (``feed``). Input beyond that is
dropped and counted, as a real UART drops what overruns it; memory stays
bounded whatever is typed or pasted. End of file or an error stops input
for good.

A machine rebuilt from saved states (a restore, an arriving migration)
gets a new UART while the supervisor is still writing the vCPUs' and the
interrupt controllers' state: ``move_to`` hands it whatever the old UART
took in (typed before the restore; its guest never ran), and input is held
until ``release``, once that state is whole: an interrupt raised before
then would be overwritten by the saved interrupt controllers and lost, and
a guest waiting for it would never read its input.
"""

from __future__ import annotations

import os
import select

READ_SIZE = 4096
# Room for a long paste into a guest that reads slowly; beyond it input is dropped.
PENDING_MAX = 64 << 10


class HostInput:
    def __init__(self, fd: int, uart, epoll: select.epoll):
        self.fd = fd
        self.uart = uart  # replaced when the machine is restored from saved states
        self._epoll = epoll
        self._pending = bytearray()
        self.held = False
        self.closed = False
        self.read_bytes = 0
        self.dropped_bytes = 0
        epoll.register(fd, select.EPOLLIN)

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.read_bytes += len(data)
        kept = data[:PENDING_MAX - len(self._pending)]
        self._pending += kept
        self.dropped_bytes += len(data) - len(kept)
        self.feed()

    def feed(self) -> None:
        """Move what waits into the FIFO as far as it has room (after each read, and after guest accesses)."""
        if self._pending and not self.held:
            accepted = self.uart.enqueue_raw_bytes(bytes(self._pending[:self.uart.fifo_capacity()]))
            del self._pending[:accepted]

    def move_to(self, uart) -> None:
        """Feed ``uart`` from now on, what the old one holds unread first; held until ``release``."""
        self._pending[:0] = self.uart.take_received()
        self.uart = uart
        self.held = True

    def release(self) -> None:
        self.held = False
        self.feed()

    def stats(self) -> dict[str, int]:
        return {"read_bytes": self.read_bytes, "pending_bytes": len(self._pending),
                "dropped_bytes": self.dropped_bytes}

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._epoll.unregister(self.fd)
            except (OSError, ValueError):
                pass
