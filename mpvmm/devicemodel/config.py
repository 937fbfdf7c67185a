"""The ``configure`` message that starts a device model, checked field by field.

Its fields are written down in docs/protocol.md ("Control channel"). A
message that fails a check is answered with ``error`` and the device model
exits 1; nothing in it is trusted before it passes.
"""

from dataclasses import dataclass

from mpvmm.devicemodel.machines import MACHINES
from mpvmm.devicemodel.protocol import SCHEMA_VERSION, SPACE_MMIO, SPACE_PIO
from mpvmm.errors import DeviceModelError
from mpvmm.transport import TRANSPORTS

# A device model polls its rings for at most this long (polling.py bounds it far lower).
MAX_POLL_LIMIT_SECONDS = 0.01


def _is_fd(value: object) -> bool:
    return type(value) is int and value >= 0


@dataclass(frozen=True)
class Config:
    """The ``configure`` message, checked."""

    ram_fd: int
    ram_size: int
    console: str | None
    # The transport: "mq" names each vCPU's queues; "ring" passes the ring
    # area's fd, the eventfd that wakes us and how long we may poll.
    transport: str = "mq"
    request_queues: tuple[str, ...] = ()
    reply_queues: tuple[str, ...] = ()
    ring_fd: int | None = None
    wake_fd: int | None = None
    poll_limit_seconds: float = 0.0
    # The Linux machine (issue 5): "pc" adds RTC, i8042 and ACPI power
    # devices; irqfds maps a device name to an inherited eventfd KVM turns
    # into its interrupt; stdin_fd, when set, feeds the UART.
    machine: str = "builtin"
    irqfds: tuple[tuple[str, int], ...] = ()
    stdin_fd: int | None = None
    # In-kernel routes: eventfds KVM signals for doorbells (fd, space,
    # address), and a vCPU fd whose mmap holds the coalesced ring at
    # page_offset (fd, page_offset), or None when nothing is coalesced.
    doorbells: tuple[tuple[int, int, int], ...] = ()
    coalesced_ring: tuple[int, int] | None = None
    # Guest RAM is mapped read-only unless set: the devices so far never
    # write guest memory; a virtio device process will.
    ram_writable: bool = False

    @classmethod
    def from_message(cls, message: object) -> "Config":
        if not isinstance(message, dict) or message.get("op") != "configure":
            raise DeviceModelError(f"expected a configure message first, got {message!r:.200}")
        if message.get("version") != SCHEMA_VERSION:
            raise DeviceModelError(
                f"configure asks for schema version {message.get('version')!r}, "
                f"this device model speaks {SCHEMA_VERSION}"
            )
        ram_fd, ram_size = message.get("ram_fd"), message.get("ram_size")
        console = message.get("console")
        if not _is_fd(ram_fd) or type(ram_size) is not int or ram_size <= 0:
            raise DeviceModelError("configure needs ram_fd (a file descriptor) and ram_size (int > 0)")
        if console is not None and not isinstance(console, str):
            raise DeviceModelError("console must be a path or None")
        machine, irqfds, stdin_fd = message.get("machine", "builtin"), message.get("irqfds", {}), message.get("stdin_fd")
        if machine not in MACHINES:
            raise DeviceModelError(f"unknown machine {machine!r}")
        if not isinstance(irqfds, dict) or not all(isinstance(k, str) and _is_fd(v) for k, v in irqfds.items()):
            raise DeviceModelError("irqfds must map device names to file descriptors")
        if stdin_fd is not None and not _is_fd(stdin_fd):
            raise DeviceModelError("stdin_fd must be a file descriptor or None")
        ram_writable = message.get("ram_writable", False)
        if type(ram_writable) is not bool:
            raise DeviceModelError("ram_writable must be true or false")
        return cls(ram_fd, ram_size, console, **_transport(message), machine=machine,
                   irqfds=tuple(sorted(irqfds.items())), stdin_fd=stdin_fd, **_in_kernel(message),
                   ram_writable=ram_writable)


def _transport(message: dict) -> dict:
    transport = message.get("transport", "mq")
    if transport not in TRANSPORTS:
        raise DeviceModelError(f"unknown transport {transport!r}")
    if transport == "ring":
        ring_fd, wake_fd, limit = message.get("ring_fd"), message.get("wake_fd"), message.get("poll_limit_seconds", 0.0)
        if not _is_fd(ring_fd) or not _is_fd(wake_fd):
            raise DeviceModelError("the ring transport needs ring_fd and wake_fd (file descriptors)")
        if type(limit) not in (int, float) or not 0 <= limit <= MAX_POLL_LIMIT_SECONDS:
            raise DeviceModelError(f"poll_limit_seconds must be between 0 and {MAX_POLL_LIMIT_SECONDS}")
        return {"transport": transport, "ring_fd": ring_fd, "wake_fd": wake_fd, "poll_limit_seconds": float(limit)}
    requests, replies = message.get("request_queues"), message.get("reply_queues")
    for queues in (requests, replies):
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            raise DeviceModelError("request_queues and reply_queues must be lists of names")
    if not requests or len(requests) != len(replies):
        raise DeviceModelError(
            f"need one reply queue per request queue, got {len(requests)} and {len(replies)}"
        )
    return {"transport": transport, "request_queues": tuple(requests), "reply_queues": tuple(replies)}


def _in_kernel(message: dict) -> dict:
    doorbells, ring = message.get("doorbells", []), message.get("coalesced_ring")
    if not isinstance(doorbells, list) or not all(
        isinstance(d, list) and len(d) == 3 and _is_fd(d[0]) and d[1] in (SPACE_PIO, SPACE_MMIO)
        and type(d[2]) is int and d[2] >= 0 for d in doorbells
    ):
        raise DeviceModelError("doorbells must be a list of [fd, space, address]")
    if ring is not None and not (isinstance(ring, list) and len(ring) == 2 and all(_is_fd(v) for v in ring)):
        raise DeviceModelError("coalesced_ring must be [vcpu_fd, page_offset] or None")
    return {"doorbells": tuple(tuple(d) for d in doorbells), "coalesced_ring": tuple(ring) if ring else None}
