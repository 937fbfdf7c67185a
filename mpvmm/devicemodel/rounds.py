"""How the device model takes requests from the vCPUs' queues: fair rounds, reads after writes.

Each vCPU has its own request queue, so the device model sees one vCPU's
requests in the order it sent them, but nothing orders two queues. Posted
writes make that visible. vCPU A writes bytes to the UART (posted: A runs
on at once) and releases the guest's lock; vCPU B takes the lock and reads
the UART's status. B's read can reach us while A's writes still wait in A's
queue; served first, B sees the UART without A's bytes, and the bytes B
writes next go out before A's. Measured: a 4-vCPU Linux guest's console
showed chunks of a line swapped. On hardware an OUT completes before the
next instruction runs, and guest drivers rely on it.

The rule that restores the order: a read is answered only after every write
that was in any queue when the read was taken. A write that happened before
the read (through the guest's own synchronisation) was sent before it, so it
is there. So a round performs writes as it takes them and keeps the reads;
before answering them it drains every other queue up to its depth, more
than a queue holds at any moment; reads found there are kept too. Nothing
follows a read in its queue (the vCPU waits for the answer), so keeping a
read to the end of the round never reorders one vCPU's own requests.
"""

from __future__ import annotations

from typing import Callable, Sequence

import posix_ipc

# ``take(index, message)`` returns this when it kept a read for the end of the round.
KEPT_READ = True


def serve_round(queues: Sequence, ready: Sequence[int], take: Callable[[int, bytes], bool], batch: int) -> list[int]:
    """Take up to ``batch`` messages from each ready queue in turn, stopping at a kept read.

    The queues are non-blocking (an empty one raises BusyError). Returns the
    indices of the queues that filled their batch and may hold more.
    """
    more = []
    for index in ready:
        queue = queues[index]
        for _ in range(batch):
            try:
                message, _priority = queue.receive()
            except posix_ipc.BusyError:
                break
            if take(index, message) is KEPT_READ:
                break  # its vCPU waits for the answer: nothing is behind it
        else:
            more.append(index)
    return more


def writes_before_reads(queues: Sequence, kept: Sequence[int], ready_now: Callable[[], Sequence[int]],
                        take: Callable[[int, bytes], bool], depth: int) -> None:
    """Drain every queue that is not waiting on a kept read, up to ``depth`` messages each.

    ``kept``: the queues whose read is kept; ``ready_now()``: the queues that
    hold messages now (an epoll with no wait). Call it before answering the
    kept reads.
    """
    if len(queues) < 2:
        return  # one vCPU: its queue is already in order
    waiting = set(kept)
    others = [index for index in ready_now() if index not in waiting]
    serve_round(queues, others, take, depth)
