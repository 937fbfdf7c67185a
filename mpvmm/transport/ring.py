"""Shared-memory message rings: the layout of ring.h, and its protocol in Python.

The C run loop's side is ``mpvmm/vcpu_worker/ring.h``; the device model and
the Python run loop speak the same protocol through ``MessageRing``. The
ctypes structures below mirror the C ones (checked against ``_runloop.layout()``
by tests/transport/test_ring_layout.py) and their sizes come from the
compiled extension, so they are written down once. ``MessageRing`` is pure
logic over a ``MsgRing`` wherever it lives (shared memory, or a bytearray
in the unit tests); the memory-ordering points are the calls to ``fence``,
the one thing plain Python stores cannot give (x86 may reorder a store with
a later load).

``RingArea`` is every vCPU's request and reply ring in one POSIX shared
memory object, created by the supervisor, unlinked the moment it is mapped
(like guest RAM) and handed to the device model as a file descriptor.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import posix_ipc

from mpvmm.errors import DeviceModelError, HostLimitError
from mpvmm.supervisor.guest_memory import map_shared, unique_name, unmap
from mpvmm.vcpu_worker import _runloop

_C = _runloop.layout()
RING_SLOTS = _C["RING_SLOTS"]
MESSAGE_SIZE = _C["RING_MESSAGE_SIZE"]
HEADER_SIZE = _C["RING_HEADER_SIZE"]
AREA_MAGIC = _C["RING_AREA_MAGIC"]
AREA_VERSION = _C["RING_AREA_VERSION"]
SPIN_SECONDS = _C["RING_SPIN_NS"] / 1e9  # how long a vCPU spins for a reply before it sleeps
_INDEX_MASK = (1 << 32) - 1
# A slot whose length is impossible comes out as a record one byte too long,
# which the decoder rejects ("too_large") like any other malformed record.
_OVERSIZED = bytes(MESSAGE_SIZE + 1)


class RingSlot(ctypes.Structure):
    _fields_ = [("length", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint8 * MESSAGE_SIZE)]


class MsgRing(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("producer_waiting", ctypes.c_uint32),
        ("producer_pad", ctypes.c_uint8 * 56),
        ("tail", ctypes.c_uint32),
        ("consumer_waiting", ctypes.c_uint32),
        ("consumer_pad", ctypes.c_uint8 * 56),
        ("slots", RingSlot * RING_SLOTS),
    ]


class RingAreaHeader(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("version", ctypes.c_uint32),
        ("vcpus", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 48),
        ("server_sleeping", ctypes.c_uint32),
        ("sleeping_pad", ctypes.c_uint8 * 60),
    ]


def _no_fence() -> None:
    """For a ring only one thread touches (the unit tests)."""


class MessageRing:
    """One single-producer, single-consumer ring of records (ring.h's protocol).

    ``fence`` is a full memory fence (``_runloop.fence``), ``futex_wake`` and
    ``futex_wait`` the futex calls on an address (``_runloop.wake`` and
    ``_runloop.futex_wait``); the defaults are the real ones.
    """

    def __init__(self, ring: MsgRing, fence: Callable[[], None] = _runloop.fence,
                 futex_wake: Callable[[int], None] = _runloop.wake,
                 futex_wait: Callable[[int, int, int], None] = _runloop.futex_wait):
        self.ring = ring
        self._fence, self._futex_wake, self._futex_wait = fence, futex_wake, futex_wait
        base = ctypes.addressof(ring)
        self._head_address = base + MsgRing.head.offset
        self._tail_address = base + MsgRing.tail.offset
        self._data_addresses = [base + MsgRing.slots.offset + i * ctypes.sizeof(RingSlot) + RingSlot.data.offset
                                for i in range(RING_SLOTS)]

    @property
    def address(self) -> int:
        return ctypes.addressof(self.ring)

    def __len__(self) -> int:
        """Records in the ring now."""
        return (self.ring.head - self.ring.tail) & _INDEX_MASK

    def push(self, record: bytes) -> bool:
        """Append ``record``; False when the ring is full. The producer's call."""
        if len(record) > MESSAGE_SIZE:
            raise ValueError(f"a {len(record)}-byte record does not fit a {MESSAGE_SIZE}-byte slot")
        ring = self.ring
        head = ring.head
        if (head - ring.tail) & _INDEX_MASK >= RING_SLOTS:
            return False
        ctypes.memmove(self._data_addresses[head % RING_SLOTS], record, len(record))
        ring.slots[head % RING_SLOTS].length = len(record)
        # Publishing: x86 keeps stores in order, so the slot is written before head.
        ring.head = (head + 1) & _INDEX_MASK
        return True

    def pop(self) -> bytes | None:
        """Take the oldest record; None when the ring is empty. The consumer's call."""
        ring = self.ring
        tail = ring.tail
        if ring.head == tail:
            return None
        length = ring.slots[tail % RING_SLOTS].length
        record = ctypes.string_at(self._data_addresses[tail % RING_SLOTS], length) if length <= MESSAGE_SIZE \
            else _OVERSIZED
        ring.tail = (tail + 1) & _INDEX_MASK
        return record

    # --- Event suppression: wake the other side only when it sleeps. ---

    def wake_consumer(self) -> bool:
        """After pushes: FUTEX_WAKE a consumer asleep on ``head``; True if one was."""
        return self._wake("consumer_waiting", self._head_address)

    def wake_producer(self) -> bool:
        """After pops: FUTEX_WAKE a producer asleep on ``tail`` for space; True if one was."""
        return self._wake("producer_waiting", self._tail_address)

    def _wake(self, waiting_flag: str, address: int) -> bool:
        self._fence()  # our index is visible before we look at the flag (ring.h's Dekker pair)
        if not getattr(self.ring, waiting_flag):
            return False
        self._futex_wake(address)
        return True

    def wait_for_record(self, timeout_seconds: float) -> bool:
        """Sleep until a record may be there (or the timeout, or a signal); True if it slept."""
        ring = self.ring
        ring.consumer_waiting = 1
        self._fence()
        head = ring.head
        slept = head == ring.tail
        if slept:
            self._futex_wait(self._head_address, head, int(timeout_seconds * 1e9))
        ring.consumer_waiting = 0
        return slept

    def wait_for_space(self, timeout_seconds: float) -> None:
        """Sleep until the full ring may have room (or the timeout, or a signal)."""
        ring = self.ring
        ring.producer_waiting = 1
        self._fence()
        tail = ring.tail
        if (ring.head - tail) & _INDEX_MASK >= RING_SLOTS:
            self._futex_wait(self._tail_address, tail, int(timeout_seconds * 1e9))
        ring.producer_waiting = 0


def area_size(cpus: int) -> int:
    """Bytes of a RingArea for ``cpus`` vCPUs: the header page, then two rings per vCPU."""
    return HEADER_SIZE + 2 * cpus * ctypes.sizeof(MsgRing)


class RingArea:
    """Every vCPU's request and reply ring, in one shared mapping.

    ``RingArea.create(cpus)`` is the supervisor's (a new, zeroed, nameless
    POSIX shared memory object); ``RingArea.attach(fd)`` the device model's,
    which checks the header before it trusts anything in the area.
    """

    def __init__(self, fd: int, address: int, size: int, cpus: int):
        self.fd, self.address, self.size, self.cpus = fd, address, size, cpus
        self.header = RingAreaHeader.from_address(address)

    @classmethod
    def create(cls, cpus: int) -> "RingArea":
        size = area_size(cpus)
        try:
            shm = posix_ipc.SharedMemory(unique_name("rings"), posix_ipc.O_CREX, mode=0o600, size=size)
        except (posix_ipc.Error, OSError) as err:
            raise HostLimitError(f"cannot create {size} bytes of message rings in /dev/shm: {err}") from err
        shm.unlink()  # nameless from here on: the fd is the only way in
        fd = shm.fd
        try:
            address = map_shared(fd, size)
        except BaseException:
            os.close(fd)
            raise
        area = cls(fd, address, size, cpus)
        area.header.magic, area.header.version, area.header.vcpus = AREA_MAGIC, AREA_VERSION, cpus
        return area

    @classmethod
    def attach(cls, fd: int) -> "RingArea":
        """Map the area the supervisor created; the fd stays ours to close."""
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise DeviceModelError(f"ring area fd {fd} holds {size} bytes, less than its header")
        address = map_shared(fd, size)
        header = RingAreaHeader.from_address(address)
        cpus = header.vcpus
        if header.magic != AREA_MAGIC or header.version != AREA_VERSION or size < area_size(cpus):
            unmap(address, size)
            raise DeviceModelError(f"ring area fd {fd} is not a version {AREA_VERSION} ring area "
                                   f"for its {cpus} vCPUs")
        return cls(fd, address, size, cpus)

    def _ring(self, index: int) -> MessageRing:
        return MessageRing(MsgRing.from_address(self.address + HEADER_SIZE + index * ctypes.sizeof(MsgRing)))

    def requests(self, vcpu: int) -> MessageRing:
        return self._ring(2 * vcpu)

    def replies(self, vcpu: int) -> MessageRing:
        return self._ring(2 * vcpu + 1)

    def close(self) -> None:
        """Unmap and close the fd; idempotent."""
        if self.address:
            self.header = None
            unmap(self.address, self.size)
            self.address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
