"""Shared-memory message rings: the layout of ring.h, and its protocol for Python.

The rings are implemented once, in ``mpvmm/vcpu_worker/ring.h``: the native
run loop calls it directly, and the device model and the Python run loop
through the extension, which is what ``MessageRing`` wraps (a push or a pop
costs about 0.1 us that way, twenty times less than the same in ctypes, and
the full fences event suppression needs are real ones). The ctypes
structures below mirror the C ones (checked against ``_runloop.layout()`` by
tests/transport/test_ring_layout.py), for the area's header and for tests;
their sizes come from the compiled extension, so they are written down once.

``RingArea`` is every vCPU's request and reply ring in one POSIX shared
memory object, created by the supervisor, unlinked the moment it is mapped
(like guest RAM) and handed to the device model as a file descriptor.
"""

from __future__ import annotations

import ctypes
import os
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


class MessageRing:
    """One single-producer, single-consumer ring of records at ``address`` (a ``MsgRing``).

    A record whose slot length is impossible comes out one byte too long, so
    the decoder rejects it (``too_large``) like any other malformed record.
    """

    def __init__(self, address: int):
        self.address = address

    def __len__(self) -> int:
        """Records in the ring now."""
        return _runloop.ring_count(self.address)

    def push(self, record: bytes) -> bool:
        """Append ``record`` (at most MESSAGE_SIZE bytes); False when the ring is full. The producer's call."""
        return _runloop.ring_push(self.address, record)

    def pop(self) -> bytes | None:
        """Take the oldest record; None when the ring is empty. The consumer's call."""
        return _runloop.ring_pop(self.address)

    # --- Event suppression: wake the other side only when it sleeps. ---

    def wake_consumer(self) -> bool:
        """After pushes: FUTEX_WAKE a consumer asleep on ``head``; True if one was."""
        return _runloop.ring_wake(self.address, False)

    def wake_producer(self) -> bool:
        """After pops: FUTEX_WAKE a producer asleep on ``tail`` for room; True if one was."""
        return _runloop.ring_wake(self.address, True)

    def wait_for_record(self, timeout_seconds: float) -> bool:
        """Sleep until a record may be there (or the timeout, or a signal); True if it slept."""
        return _runloop.ring_wait(self.address, False, int(timeout_seconds * 1e9))

    def wait_for_space(self, timeout_seconds: float) -> None:
        """Sleep until the full ring may have room (or the timeout, or a signal)."""
        _runloop.ring_wait(self.address, True, int(timeout_seconds * 1e9))


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
        return MessageRing(self.address + HEADER_SIZE + index * ctypes.sizeof(MsgRing))

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
