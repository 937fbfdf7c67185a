"""A vCPU's end of its transport to the device model: a queue pair or a ring pair.

The native run loop gets ``native_args()`` and speaks the transport in C
(_runloop.c, ring.h); the Python run loop calls ``send`` and ``receive``.
Both keep the same counters in the vCPU's stats page: ``posted_stalls``
for a request that found no room, and with rings ``server_wakeups`` (the
device model was asleep and this vCPU woke it) and ``reply_sleeps`` (the
reply did not come while the vCPU spun for it).

Every request a channel carries is stamped with the next value of one
machine-wide counter (``RequestOrder``, shared by every vCPU's channel), so
that the device model can perform the requests of all vCPUs in the order
they were made (devicemodel/rounds.py).
"""

from __future__ import annotations

import ctypes
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import posix_ipc

from mpvmm.supervisor.guest_memory import map_shared, unmap
from mpvmm.transport.ring import SPIN_SECONDS, MessageRing, RingAreaHeader
from mpvmm.vcpu_worker import _runloop

TRANSPORT_MQ, TRANSPORT_RING = 0, 1  # enum transport_kind in _runloop.c
KICK_POLL_SECONDS = 0.1  # as KICK_POLL_NS in _runloop.c: the longest any wait lasts


ORDER_PAGE_SIZE = 4096


class RequestOrder:
    """The machine-wide request counter: one 64-bit word in a shared page a forked worker inherits."""

    address = 0  # class-level default, so close() works after a failed __init__

    def __init__(self):
        self.address = map_shared(-1, ORDER_PAGE_SIZE)

    def close(self) -> None:
        if self.address:
            unmap(self.address, ORDER_PAGE_SIZE)
            self.address = 0


class VcpuChannel(ABC):
    """How one vCPU's runner reaches the device model."""

    order_address = 0  # the RequestOrder's counter

    def next_stamp(self) -> int:
        """The sequence number of the request about to be sent (what _runloop.c's next_stamp takes)."""
        return _runloop.next_stamp(self.order_address)

    @abstractmethod
    def native_args(self) -> tuple[int, int, int, int, int, int]:
        """The transport as _runloop.run takes it."""

    @abstractmethod
    def fds(self) -> tuple[int, ...]:
        """File descriptors a worker process must keep open to use the channel."""

    @abstractmethod
    def send(self, record: bytes, stats, stop_requested: Callable[[], bool]) -> bool:
        """Send one request, waiting while there is no room; False if a stop came first."""

    @abstractmethod
    def receive(self, stats) -> bytes | None:
        """One reply, waiting up to KICK_POLL_SECONDS (less if interrupted); None if none came."""


class QueueChannel(VcpuChannel):
    """A request and a reply POSIX message queue."""

    def __init__(self, request_queue: posix_ipc.MessageQueue, reply_queue: posix_ipc.MessageQueue,
                 order: RequestOrder):
        self.request_queue, self.reply_queue = request_queue, reply_queue
        self.order_address = order.address

    def native_args(self) -> tuple[int, int, int, int, int, int]:
        return TRANSPORT_MQ, self.request_queue.mqd, self.reply_queue.mqd, 0, -1, self.order_address

    def fds(self) -> tuple[int, ...]:
        return self.request_queue.mqd, self.reply_queue.mqd

    def send(self, record: bytes, stats, stop_requested: Callable[[], bool]) -> bool:
        try:
            self.request_queue.send(record, timeout=0)
            return True
        except posix_ipc.BusyError:
            stats.posted_stalls += 1
        while not stop_requested():
            try:
                self.request_queue.send(record, timeout=KICK_POLL_SECONDS)
                return True
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                continue
        return False

    def receive(self, stats) -> bytes | None:
        try:
            return self.reply_queue.receive(timeout=KICK_POLL_SECONDS)[0]
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return None


class RingChannel(VcpuChannel):
    """A request and a reply ring of the shared RingArea, and the device model's wake-up eventfd."""

    def __init__(self, requests: MessageRing, replies: MessageRing, header: RingAreaHeader, wake_fd: int,
                 order: RequestOrder):
        self.requests, self.replies, self.header, self.wake_fd = requests, replies, header, wake_fd
        self.order_address = order.address
        self._header_address = ctypes.addressof(header)
        self._server_was_awake = False

    def native_args(self) -> tuple[int, int, int, int, int, int]:
        return (TRANSPORT_RING, self.requests.address, self.replies.address, self._header_address, self.wake_fd,
                self.order_address)

    def fds(self) -> tuple[int, ...]:
        return (self.wake_fd,)

    def _wake_server(self, stats) -> None:
        """Wake the device model if (and only if) it said it is going to sleep."""
        if _runloop.ring_wake_server(self._header_address, self.wake_fd):
            stats.server_wakeups += 1

    def send(self, record: bytes, stats, stop_requested: Callable[[], bool]) -> bool:
        if not self.requests.push(record):
            stats.posted_stalls += 1
            while not self.requests.push(record):
                self._wake_server(stats)
                if stop_requested():
                    return False
                self.requests.wait_for_space(KICK_POLL_SECONDS)
        self._server_was_awake = not self.header.server_sleeping
        self._wake_server(stats)
        return True

    def receive(self, stats) -> bytes | None:
        record = self.replies.pop()
        if record is not None:
            return record
        if self._server_was_awake:
            self._server_was_awake = False
            end = time.monotonic() + SPIN_SECONDS
            while time.monotonic() < end:
                record = self.replies.pop()
                if record is not None:
                    return record
        if self.replies.wait_for_record(KICK_POLL_SECONDS):
            stats.reply_sleeps += 1
        return self.replies.pop()
