"""How the device model takes requests from the vCPUs' channels: in the order they were made.

Each vCPU has its own request channel (a message queue or a shared-memory
ring, transport/server.py), so the device model sees one vCPU's requests in
the order it sent them, but nothing orders two channels. Posted writes make
that visible, since a vCPU runs on before its write is performed:

- vCPU A writes bytes to the UART and releases the guest's lock; vCPU B
  takes the lock and reads the UART's status. Served first, B's read sees
  the UART without A's bytes, and the bytes B writes next go out before
  A's (a 4-vCPU Linux guest's console showed chunks of a line swapped).
- vCPU A's interrupt handler turns the UART's transmit interrupt off (a
  write to IER) and releases the port lock; vCPU B takes it, has more to
  send and turns the interrupt on. Performed B first, the UART ends with
  the interrupt off while the driver believes it on: Linux's console
  stalled mid-line (the nested soak found it).

On hardware an OUT completes before the next instruction runs, and guest
drivers rely on it. So every request carries a stamp: the next value of one
machine-wide counter, taken after its exit and before it is sent
(transport/channel.py, _runloop.c). A request that happened before another
in the guest (earlier on the same vCPU, or on another vCPU before the
guest's own synchronisation) was stamped and sent before the other was even
made, so it has the smaller stamp and is in its channel by the time the
other can be seen. The device model performs requests in stamp order, with
one care: it looks at the channels one after another, so a request may
arrive in a channel it has just looked at. Before it performs the smallest
stamp it holds, it looks again at every channel it holds nothing from;
whatever happened before that request is there by then (it was sent before
that request was made, and we have seen that request). A smaller stamp
found this way becomes the candidate and the look is repeated. Requests
made concurrently (neither before the other) are performed in stamp order
too, one of the orders they could have had.

Writes KVM coalesced carry no stamp: they sit in KVM's own ring, in the
order they were made, and the device model's ``perform`` drains that ring
before each access it performs, so they precede every request sent after
them.
"""

from __future__ import annotations

from typing import Protocol

from mpvmm.devicemodel.protocol import Request


class Channels(Protocol):
    """Every vCPU's request and reply channel (transport/server.py)."""

    def pop(self, index: int) -> bytes | None:
        """The oldest record of vCPU ``index``'s requests; None when there is none."""

    def ready_now(self) -> list[int]:
        """The vCPUs whose request channels hold records now."""


class Decoder(Protocol):
    def decode(self, record: bytes) -> Request | None:
        """The request in ``record``, or None: malformed (counted and dropped)."""


class Device(Decoder, Protocol):
    """The device model as the server sees it (devicemodel/process.py)."""

    def perform(self, request: Request) -> bytes | None:
        """Perform it (after every write KVM coalesced); the encoded reply, if the vCPU waits for one."""


class StampOrder:
    """The vCPUs' requests merged into stamp order: at most one taken and not yet handed out per channel."""

    def __init__(self, channels: Channels, decoder: Decoder, vcpus: int):
        self._channels, self._decoder, self._vcpus = channels, decoder, vcpus
        # channel -> (when it was taken, its oldest request), taken and not handed out yet
        self._heads: dict[int, tuple[int, Request]] = {}
        self._taken = 0
        # Requests handed out before one taken earlier: taken out of the order they were made.
        self.reordered = 0

    def held(self) -> bool:
        """Whether requests were taken that ``next`` has not handed out yet."""
        return bool(self._heads)

    def next(self) -> tuple[int, Request] | None:
        """The request to perform now and the channel it came from; None when every channel is empty."""
        self._look()
        if not self._heads:
            return None
        while True:
            candidate = min(self._heads, key=lambda index: self._heads[index][1].seq)
            if self._vcpus == 1 or not self._look(below=self._heads[candidate][1].seq):
                taken, request = self._heads.pop(candidate)
                if any(other < taken for other, _ in self._heads.values()):
                    self.reordered += 1
                return candidate, request

    def _look(self, below: int | None = None) -> bool:
        """Take the oldest request of each channel we hold nothing from; whether one is stamped below ``below``."""
        found = False
        for index in self._channels.ready_now():
            if index in self._heads:
                continue
            request = self._take(index)
            if request is not None:
                self._heads[index] = (self._taken, request)
                self._taken += 1
                found = found or (below is not None and request.seq < below)
        return found

    def _take(self, index: int) -> Request | None:
        while (record := self._channels.pop(index)) is not None:
            request = self._decoder.decode(record)
            if request is not None:
                return request
        return None
