"""The ``configure`` message that starts a virtio device process, checked field by field.

Fields (docs/protocol.md, "virtio device processes"): ``name`` (the device's
name in messages and metrics), ``kind`` (``block``, ``console`` or
``entropy``), guest RAM (``ram_fd``, ``ram_size``, ``regions``: guest
address, size and offset of each RAM range), the inherited descriptors
(``registers_fd``: the device model's register link; ``irq_fd``: the irqfd;
``notify_fds``: one ioeventfd per queue, in queue order; ``backing_fd``: the
disk file for a block device, the output for a console; ``input_fd``: a
console's terminal, or None) and the block device's ``read_only``,
``disk_id`` and ``queues``. Nothing in it is trusted before it passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpvmm.errors import DeviceModelError

SCHEMA_VERSION = 1
KINDS = ("block", "console", "entropy")
MAX_BLOCK_QUEUES = 64  # virtio/block.py's MAX_QUEUES
MAX_DISK_ID = 20  # virtio-blk's GET_ID answer


def _fd(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise DeviceModelError(f"configure: {what} must be a file descriptor, not {value!r:.40}")
    return value


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    kind: str
    ram_fd: int
    ram_size: int
    regions: tuple[tuple[int, int, int], ...]
    registers_fd: int
    irq_fd: int
    notify_fds: tuple[int, ...]
    backing_fd: int | None = None
    input_fd: int | None = None
    read_only: bool = False
    disk_id: bytes = b""
    queues: int = 1

    @classmethod
    def from_message(cls, message: object) -> "DeviceConfig":
        if not isinstance(message, dict) or message.get("op") != "configure":
            raise DeviceModelError(f"expected a configure message first, got {message!r:.200}")
        if message.get("version") != SCHEMA_VERSION:
            raise DeviceModelError(f"configure asks for schema version {message.get('version')!r}, "
                                   f"this device process speaks {SCHEMA_VERSION}")
        name, kind = message.get("name"), message.get("kind")
        if not isinstance(name, str) or not name or kind not in KINDS:
            raise DeviceModelError(f"configure needs a name and a kind ({', '.join(KINDS)})")
        ram_size, regions = message.get("ram_size"), message.get("regions")
        if type(ram_size) is not int or ram_size <= 0:
            raise DeviceModelError("configure: ram_size must be an int > 0")
        if not isinstance(regions, list) or not regions or not all(
                isinstance(r, list) and len(r) == 3 and all(type(v) is int and v >= 0 for v in r) for r in regions):
            raise DeviceModelError("configure: regions must be [guest address, size, offset] triples")
        notify = message.get("notify_fds")
        if not isinstance(notify, list) or not notify:
            raise DeviceModelError("configure: notify_fds must list one eventfd per queue")
        queues, disk_id, read_only = message.get("queues", 1), message.get("disk_id", b""), message.get("read_only", False)
        if type(queues) is not int or not 1 <= queues <= MAX_BLOCK_QUEUES:
            raise DeviceModelError(f"configure: queues must be 1 to {MAX_BLOCK_QUEUES}")
        if not isinstance(disk_id, bytes) or len(disk_id) > MAX_DISK_ID or type(read_only) is not bool:
            raise DeviceModelError("configure: disk_id must be at most 20 bytes and read_only a bool")
        backing, terminal = message.get("backing_fd"), message.get("input_fd")
        if kind != "entropy" and backing is None:
            raise DeviceModelError(f"configure: a {kind} device needs backing_fd")
        return cls(name, kind, _fd(message.get("ram_fd"), "ram_fd"), ram_size,
                   tuple(tuple(region) for region in regions),
                   _fd(message.get("registers_fd"), "registers_fd"), _fd(message.get("irq_fd"), "irq_fd"),
                   tuple(_fd(fd, "a notify fd") for fd in notify),
                   None if backing is None else _fd(backing, "backing_fd"),
                   None if terminal is None else _fd(terminal, "input_fd"),
                   read_only, disk_id, queues)
