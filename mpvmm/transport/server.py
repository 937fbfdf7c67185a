"""The device model's end of the transport: every vCPU's requests, in per-vCPU order.

``QueueServer`` reads POSIX message queues (pollable descriptors, so epoll
says which have messages); ``RingServer`` reads the shared-memory rings,
polls them for a while before it sleeps (polling.py) and sleeps on one
eventfd the vCPUs write only when it said it sleeps (ring.h). Both perform
requests in the order the vCPUs made them (devicemodel/rounds.py: by their
machine-wide stamps), which is also fair: a busy vCPU's requests interleave
with the others' as they were made. Both answer a request on the reply
channel paired with the one it came from, whatever vCPU the (untrusted)
record claims to be.

The device model's loop (devicemodel/process.py) drives either the same
way: ``serve`` a round, and when there is nothing left, ``poll`` and then
``prepare_sleep`` before it sleeps in epoll, ``woke`` after.
"""

from __future__ import annotations

import os
import select
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import posix_ipc

from mpvmm.devicemodel.rounds import Device, StampOrder
from mpvmm.errors import DeviceModelError
from mpvmm.transport.polling import PollWindow
from mpvmm.transport.ring import RingArea
from mpvmm.vcpu_worker import _runloop

# Requests performed per vCPU in one serve() before the device model's other
# work (the terminal, timers, the control socket) gets a turn.
PER_VCPU_BATCH = 8
# Rounds of the final drain at shutdown: bounded, since running vCPUs may keep sending.
SHUTDOWN_DRAIN_ROUNDS = 64
# A look at the rings that came back this late means the polling device model
# was descheduled: something else wanted the core.
POLL_PREEMPTED_SECONDS = 50e-6


class RequestServer(ABC):
    """Every vCPU's request and reply channel, as the device model sees them (rounds.Channels)."""

    name: str

    def __init__(self, vcpus: int):
        self.received = [0] * vcpus
        self.replies_sent = self.replies_dropped = 0
        self._order: StampOrder | None = None

    @abstractmethod
    def fds(self) -> list[int]:
        """Descriptors to wait on in epoll; readable means requests may be waiting."""

    @abstractmethod
    def _pop(self, index: int) -> bytes | None:
        """The oldest record on vCPU ``index``'s request channel, or None."""

    def pop(self, index: int) -> bytes | None:
        """``_pop``, counted (rounds.Channels)."""
        record = self._pop(index)
        if record is not None:
            self.received[index] += 1
        return record

    @abstractmethod
    def reply(self, index: int, record: bytes) -> None:
        """Send ``record`` on vCPU ``index``'s reply channel (dropped and counted if it is full)."""

    @abstractmethod
    def ready_now(self) -> list[int]:
        """The vCPUs whose request channels hold records now."""

    def serve(self, ready_fds: set[int], device: Device) -> bool:
        """Perform requests in stamp order, up to one a vCPU waits for; True when more may be waiting.

        At most a batch per vCPU, so that the device model's other work gets a turn.

        ``ready_fds``: what epoll found readable (every channel is looked at anyway).
        """
        if self._order is None:
            self._order = StampOrder(self, device, len(self.received))
        budget = PER_VCPU_BATCH * len(self.received)
        performed = 0
        while performed < budget:
            taken = self._order.next()
            if taken is None:
                break
            index, request = taken
            reply = device.perform(request)
            performed += 1
            if reply is not None:
                # A vCPU waited for this: answered, it sends its next request
                # some time later, which polling looks for (transport/polling.py).
                self.reply(index, reply)
                break
        return self._served(self._order.held() or performed == budget)

    def _served(self, more: bool) -> bool:
        return more

    def poll(self) -> bool:
        """Before sleeping: look for requests a little longer; True if one came."""
        return False

    def prepare_sleep(self) -> bool:
        """About to sleep in epoll; False if a request arrived meanwhile (do not sleep)."""
        return True

    def woke(self, ready_fds: set[int]) -> None:
        """Back from epoll (``ready_fds`` were readable)."""

    def drain(self, device: Device) -> None:
        """Serve until nothing is left (bounded: running vCPUs may keep sending)."""
        everything = set(self.fds())
        for _ in range(SHUTDOWN_DRAIN_ROUNDS):
            if not self.serve(everything, device):
                break

    def stats(self) -> dict:
        return {"transport": self.name, "received": list(self.received),
                "replies_sent": self.replies_sent, "replies_dropped": self.replies_dropped,
                "reordered": self._order.reordered if self._order is not None else 0}

    @abstractmethod
    def close(self) -> None:
        """Close every channel; safe after a partial start."""


class QueueServer(RequestServer):
    """Request and reply POSIX message queues, opened by name and unlinked at once."""

    name = "mq"

    def __init__(self, request_names: Sequence[str], reply_names: Sequence[str]):
        super().__init__(len(request_names))
        self.requests: list[posix_ipc.MessageQueue] = []
        self.replies: list[posix_ipc.MessageQueue] = []
        self._epoll: select.epoll | None = None
        for names, queues, reading in ((request_names, self.requests, True), (reply_names, self.replies, False)):
            for name in names:
                try:
                    queue = posix_ipc.MessageQueue(name, read=reading, write=not reading)
                except posix_ipc.Error as err:
                    self.close()
                    raise DeviceModelError(f"cannot open message queue {name!r}: {err}") from err
                # We are the last to open it: no name may outlive this moment.
                queue.unlink()
                # Never block: an empty request queue or a full reply queue
                # (a vCPU not reading) raises BusyError instead.
                queue.block = False
                queues.append(queue)
        self._index_by_fd = {queue.mqd: index for index, queue in enumerate(self.requests)}
        # Which queues hold messages now, in one call (the stamp order asks before each request it hands out).
        self._epoll = select.epoll()
        for fd in self._index_by_fd:
            self._epoll.register(fd, select.EPOLLIN)

    def fds(self) -> list[int]:
        return list(self._index_by_fd)

    def _pop(self, index: int) -> bytes | None:
        try:
            message, _priority = self.requests[index].receive()
        except posix_ipc.BusyError:
            return None
        return message

    def reply(self, index: int, record: bytes) -> None:
        try:
            self.replies[index].send(record)
            self.replies_sent += 1
        except posix_ipc.Error:
            self.replies_dropped += 1

    def ready_now(self) -> list[int]:
        return [self._index_by_fd[fd] for fd, _mask in self._epoll.poll(0)]

    def close(self) -> None:
        for queue in self.requests + self.replies:
            try:
                queue.close()
            except posix_ipc.Error:
                pass
        self.requests, self.replies = [], []
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


class RingServer(RequestServer):
    """The vCPUs' rings in the shared RingArea, and the eventfd they wake us through."""

    name = "ring"

    def __init__(self, area: RingArea, wake_fd: int, poll_limit: float,
                 clock: Callable[[], float] = time.monotonic, yield_cpu: Callable[[], None] = os.sched_yield):
        super().__init__(area.cpus)
        self.area, self.wake_fd = area, wake_fd
        self.requests = [area.requests(i) for i in range(area.cpus)]
        self.replies = [area.replies(i) for i in range(area.cpus)]
        self.window = PollWindow(limit=poll_limit)
        self._clock, self._yield = clock, yield_cpu
        self._idle_since: float | None = None
        self.wakeups = self.polled_hits = self.sleeps = self.poll_preempted = 0
        self.poll_seconds = 0.0
        self._found = False  # this round took a record

    def fds(self) -> list[int]:
        return [self.wake_fd]

    def _pending(self) -> bool:
        return any(len(ring) for ring in self.requests)

    def _pop(self, index: int) -> bytes | None:
        record = self.requests[index].pop()
        if record is not None:
            self._found = True
            self.requests[index].wake_producer()  # it may wait for the room we just made
        return record

    def reply(self, index: int, record: bytes) -> None:
        replies = self.replies[index]
        if replies.push(record):
            self.replies_sent += 1
            replies.wake_consumer()
        else:
            self.replies_dropped += 1  # a vCPU that does not read its replies

    def ready_now(self) -> list[int]:
        return [index for index, ring in enumerate(self.requests) if len(ring)]

    def serve(self, ready_fds: set[int], device: Device) -> bool:
        self._found = False
        return super().serve(ready_fds, device)

    def _served(self, more: bool) -> bool:
        if self._found and self._idle_since is not None:
            self.window.record(self._clock() - self._idle_since)  # how long the wait for this work was
            self._idle_since = None
        if not more and self._idle_since is None:
            self._idle_since = self._clock()
        return bool(more)

    def poll(self) -> bool:
        """Look at the rings for the current window (zero: do not poll at all).

        Like KVM's halt polling, which stops as soon as another task is
        runnable on its CPU, it never holds a core someone else wants: it
        yields between looks, and a look that comes back late (we were
        descheduled) ends the polling. As in KVM, the window itself follows
        only how long the wait turns out to be (``serve``).
        """
        if not self.window.window:
            return False
        start = last = self._clock()
        end = start + self.window.window
        hit = False
        while not hit and last < end:
            self._yield()
            now = self._clock()
            if now - last > POLL_PREEMPTED_SECONDS:
                self.poll_preempted += 1
                last = now
                break
            last = now
            hit = self._pending()
        self.poll_seconds += last - start
        self.polled_hits += hit
        return hit

    def prepare_sleep(self) -> bool:
        header = self.area.header
        header.server_sleeping = 1
        _runloop.fence()  # the flag is visible before we look at the rings again
        if self._pending():
            header.server_sleeping = 0
            return False
        self.sleeps += 1
        return True

    def woke(self, ready_fds: set[int]) -> None:
        self.area.header.server_sleeping = 0
        if self.wake_fd in ready_fds:
            try:
                os.eventfd_read(self.wake_fd)
                self.wakeups += 1
            except BlockingIOError:
                pass

    def stats(self) -> dict:
        return {**super().stats(), "wakeups": self.wakeups, "polled_hits": self.polled_hits,
                "sleeps": self.sleeps, "poll_seconds": self.poll_seconds, "poll_preempted": self.poll_preempted,
                "poll_window_seconds": self.window.window, "poll_limit_seconds": self.window.limit}

    def close(self) -> None:
        self.requests, self.replies = [], []
        self.area.close()
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
