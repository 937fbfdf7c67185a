"""How the device model takes requests from the vCPUs' channels: fair rounds, reads after writes.

Each vCPU has its own request channel (a message queue or a shared-memory
ring, transport/server.py), so the device model sees one vCPU's requests in
the order it sent them, but nothing orders two channels. Posted writes make
that visible. vCPU A writes bytes to the UART (posted: A runs on at once)
and releases the guest's lock; vCPU B takes the lock and reads the UART's
status. B's read can reach us while A's writes still wait in A's channel;
served first, B sees the UART without A's bytes, and the bytes B writes
next go out before A's. Measured: a 4-vCPU Linux guest's console showed
chunks of a line swapped. On hardware an OUT completes before the next
instruction runs, and guest drivers rely on it.

The rule that restores the order: a read is answered only after every write
that was in any channel when the read was taken, and every write in KVM's
coalesced ring (the device model's ``perform`` drains that ring before each
access it performs). A write that happened before the read (through the
guest's own synchronisation) was sent, or appended by KVM, before it, so it
is there. So a round performs writes as it takes them and keeps the reads;
before answering them it drains every other channel up to its depth, more
than a channel holds at any moment; reads found there are kept too. Nothing
follows a read in its channel (the vCPU waits for the answer), so keeping a
read to the end of the round never reorders one vCPU's own requests. A
write the vCPU waits for (a coalesced ring's overflow) is performed and
acknowledged at once: nothing follows it either.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from mpvmm.devicemodel.protocol import Request


class Channels(Protocol):
    """Every vCPU's request and reply channel (transport/server.py)."""

    def pop(self, index: int) -> bytes | None:
        """The oldest record of vCPU ``index``'s requests; None when there is none."""

    def reply(self, index: int, record: bytes) -> None:
        """Send ``record`` on the reply channel paired with request channel ``index``."""


class Device(Protocol):
    """The device model as a round sees it (devicemodel/process.py)."""

    def decode(self, record: bytes) -> Request | None:
        """The request in ``record``, or None: malformed (counted and dropped)."""

    def perform(self, request: Request) -> bytes | None:
        """Perform it (after every write KVM coalesced); the encoded reply, if the vCPU waits for one."""


Kept = list[tuple[int, Request]]  # reads taken and not yet answered: (channel, request)


def take(channels: Channels, index: int, device: Device, kept: Kept, batch: int) -> tuple[int, bool]:
    """Take up to ``batch`` records of channel ``index``, stopping at one its vCPU waits on.

    Writes are performed as they come; a read is kept for the end of the
    round. Returns (records taken, whether the batch was filled and more may
    wait).
    """
    for taken in range(batch):
        record = channels.pop(index)
        if record is None:
            return taken, False
        request = device.decode(record)
        if request is None:
            continue
        if request.is_read:
            kept.append((index, request))
            return taken + 1, False  # its vCPU waits for the answer: nothing is behind it
        reply = device.perform(request)
        if reply is not None:  # a write its vCPU waits for: nothing is behind it either
            channels.reply(index, reply)
            return taken + 1, False
    return batch, True


def answer_reads(channels: Channels, device: Device, kept: Kept, ready_now: Callable[[], Sequence[int]],
                 take_all: Callable[[int], object], vcpus: int) -> None:
    """Drain every channel not waiting on a kept read, then answer the reads.

    ``ready_now()``: the channels that hold records now; ``take_all(index)``:
    ``take`` from that channel up to its depth, into ``kept``. With one vCPU
    its channel is already in order.
    """
    if not kept:
        return
    if vcpus > 1:
        waiting = {index for index, _ in kept}
        for index in ready_now():
            if index not in waiting:
                take_all(index)
    reads = list(kept)
    kept.clear()
    for index, request in reads:
        reply = device.perform(request)
        if reply is not None:
            channels.reply(index, reply)
