"""The ``configure`` message that starts a device model, checked field by field.

Its fields are written down in docs/protocol.md ("Control channel"). A
message that fails a check is answered with ``error`` and the device model
exits 1; nothing in it is trusted before it passes.
"""

from dataclasses import dataclass

from mpvmm.devicemodel.protocol import SCHEMA_VERSION
from mpvmm.errors import DeviceModelError


@dataclass(frozen=True)
class Config:
    """The ``configure`` message, checked."""

    ram_fd: int
    ram_size: int
    request_queues: tuple[str, ...]
    reply_queues: tuple[str, ...]
    console: str | None
    # The Linux machine (issue 5): "pc" adds RTC, i8042 and ACPI power
    # devices; irqfds maps a device name to an inherited eventfd KVM turns
    # into its interrupt; stdin_fd, when set, feeds the UART.
    machine: str = "builtin"
    irqfds: tuple[tuple[str, int], ...] = ()
    stdin_fd: int | None = None
    # Guest RAM is mapped read-only unless set: the devices so far never
    # write guest memory; a virtio device process will.
    ram_writable: bool = False
    # The virtio devices' register links (virtio_device/register_link.py):
    # (name, MMIO window base, inherited socket) each.
    virtio_links: tuple[tuple[str, int, int], ...] = ()

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
        requests, replies = message.get("request_queues"), message.get("reply_queues")
        console = message.get("console")
        if type(ram_fd) is not int or ram_fd < 0 or type(ram_size) is not int or ram_size <= 0:
            raise DeviceModelError("configure needs ram_fd (a file descriptor) and ram_size (int > 0)")
        for queues in (requests, replies):
            if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
                raise DeviceModelError("request_queues and reply_queues must be lists of names")
        if not requests or len(requests) != len(replies):
            raise DeviceModelError(
                f"need one reply queue per request queue, got {len(requests)} and {len(replies)}"
            )
        if console is not None and not isinstance(console, str):
            raise DeviceModelError("console must be a path or None")
        machine, irqfds, stdin_fd = message.get("machine", "builtin"), message.get("irqfds", {}), message.get("stdin_fd")
        if machine not in ("builtin", "pc"):
            raise DeviceModelError(f"unknown machine {machine!r}")
        if not isinstance(irqfds, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in irqfds.items()
        ):
            raise DeviceModelError("irqfds must map device names to file descriptors")
        if stdin_fd is not None and (type(stdin_fd) is not int or stdin_fd < 0):
            raise DeviceModelError("stdin_fd must be a file descriptor or None")
        ram_writable = message.get("ram_writable", False)
        if type(ram_writable) is not bool:
            raise DeviceModelError("ram_writable must be true or false")
        links = message.get("virtio_links", [])
        if not isinstance(links, list) or not all(
            isinstance(link, list) and len(link) == 3 and isinstance(link[0], str)
            and all(type(v) is int and v >= 0 for v in link[1:]) for link in links
        ):
            raise DeviceModelError("virtio_links must be [name, window base, file descriptor] triples")
        return cls(ram_fd, ram_size, tuple(requests), tuple(replies), console,
                   machine, tuple(sorted(irqfds.items())), stdin_fd, ram_writable,
                   tuple(tuple(link) for link in links))
