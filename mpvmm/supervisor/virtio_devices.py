"""The VM's virtio devices: what the command line asks for, and a process per device.

Each device (``--disk``, ``--console-device virtio``, ``--rng``) gets slot
``i`` in the order given: its MMIO window and GSI come from
``layout.virtio_slot(i)``, the one place both are chosen. For each the
supervisor, which alone may call VM ioctls (docs/design.md, "The
address-space rule"), registers

- a doorbell per queue (supervisor/in_kernel.py, `add_doorbell`: an ioeventfd
  route) on the window's QueueNotify register, matching the
  queue's index: a kick never leaves the kernel, the device process wakes;
- the irqfd of the device's GSI (``irq_lines``, connected with the machine's
  own lines);

and makes a ``SOCK_SEQPACKET`` socketpair, one end for the device model
(whose bus forwards the window's register accesses over it) and one for the
device process. It opens the disk file or console itself and hands over the
descriptor: the device process never opens a file.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpvmm.errors import DeviceModelError, StateError, UsageError
from mpvmm.supervisor.process_control import ControlledProcess
from mpvmm.virtio import mmio_registers
from mpvmm.virtio.block import MAX_QUEUES
from mpvmm.virtio.console import Console
from mpvmm.virtio.entropy import Entropy
from mpvmm.vcpu_worker.route_table import ACTION_IOEVENTFD, SPACE_MMIO, Route
from mpvmm.virtio_device.config import MAX_DISK_ID, SCHEMA_VERSION
from mpvmm.x86 import layout

CONSOLE_DEVICES = ("uart", "virtio")
DEVICE_MODULE = "mpvmm.virtio_device"


@dataclass(frozen=True)
class VirtioSpec:
    """One device the command line asks for: its name (in messages and metrics), kind and backing."""

    name: str
    kind: str  # "block", "console", "entropy"
    path: str | None = None
    read_only: bool = False

    def queue_count(self, block_queues: int) -> int:
        if self.kind == "block":
            return block_queues
        return len(Console.queue_sizes) if self.kind == "console" else len(Entropy.queue_sizes)


def parse_disk(text: str, index: int) -> VirtioSpec:
    """``PATH[,readonly]`` as ``--disk`` takes it, checked now: a bad one creates nothing."""
    path, _, options = text.partition(",")
    if options not in ("", "readonly") or not path:
        raise UsageError(f"--disk {text!r}: expected PATH or PATH,readonly")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UsageError(f"--disk {path}: {err.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise UsageError(f"--disk {path}: not a regular file or block device")
    read_only = options == "readonly"
    if not os.access(path, os.R_OK if read_only else os.R_OK | os.W_OK):
        raise UsageError(f"--disk {path}: not {'readable' if read_only else 'readable and writable'} by this user")
    return VirtioSpec(f"disk{index}", "block", path, read_only)


def device_specs(disks: Sequence[str], console_device: str, rng: bool) -> list[VirtioSpec]:
    """Every virtio device of a run, in slot order: disks, then the console, then the entropy device."""
    if console_device not in CONSOLE_DEVICES:
        raise UsageError(f"unknown console device {console_device!r} (choose from {', '.join(CONSOLE_DEVICES)})")
    specs = [parse_disk(text, index) for index, text in enumerate(disks)]
    if console_device == "virtio":
        specs.append(VirtioSpec("console", "console"))
    if rng:
        specs.append(VirtioSpec("rng", "entropy"))
    if len(specs) > layout.VIRTIO_MAX_DEVICES:
        raise UsageError(f"at most {layout.VIRTIO_MAX_DEVICES} virtio devices, not {len(specs)}")
    return specs


def irq_lines(specs: Sequence[VirtioSpec]) -> dict[str, int]:
    """Device name -> GSI, to connect with the machine's own lines."""
    return {spec.name: layout.virtio_slot(index)[1] for index, spec in enumerate(specs)}


def windows(count: int) -> list[tuple[int, int]]:
    """(window base, GSI) of the first ``count`` slots: what a DSDT or the built-in guest is told."""
    return [layout.virtio_slot(index) for index in range(count)]


class VirtioDevice(ControlledProcess):
    """One device's process, started and configured; its ``link`` end goes to the device model."""

    module = DEVICE_MODULE

    def __init__(self, spec: VirtioSpec, memory, irq_fd: int, notify_fds: list[int], *, block_queues: int,
                 console_path: str | None, input_fd: int | None):
        self.spec = spec
        self.link, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        backing = None
        # A descriptor of our own for the terminal: fd 0 itself would not reach
        # the process, whose fd 0 is /dev/null whatever pass_fds says.
        input_fd = os.dup(input_fd) if input_fd is not None else None
        try:
            backing = _open_backing(spec, console_path)
            fds = [memory.fd, device_end.fileno(), irq_fd, *notify_fds, *([] if backing is None else [backing]),
                   *([] if input_fd is None else [input_fd])]
            super().__init__(spec.name, fds)
            self.start({
                "op": "configure", "version": SCHEMA_VERSION, "name": spec.name, "kind": spec.kind,
                "ram_fd": memory.fd, "ram_size": memory.size,
                "regions": [list(region) for region in memory.regions()],
                "registers_fd": device_end.fileno(), "irq_fd": irq_fd, "notify_fds": notify_fds,
                "backing_fd": backing, "input_fd": input_fd, "read_only": spec.read_only,
                "disk_id": spec.name.encode()[:MAX_DISK_ID], "queues": block_queues,
            })
        except BaseException:
            self.link.close()
            self.close()
            raise
        finally:
            device_end.close()
            for fd in (backing, input_fd):
                if fd is not None:
                    os.close(fd)

    def close(self) -> None:
        super().close()
        self.link.close()


def _open_backing(spec: VirtioSpec, console_path: str | None) -> int | None:
    """The descriptor the device process gets for its disk or console output (ours to close)."""
    if spec.kind == "block":
        try:
            return os.open(spec.path, (os.O_RDONLY if spec.read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"--disk {spec.path}: {err.strerror}") from None
    if spec.kind == "console":
        if console_path is None:
            return os.dup(1)
        return os.open(console_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return None


class VirtioDevices:
    """Every virtio device of a VM, each in its process; closed (killed) together."""

    def __init__(self, specs: Sequence[VirtioSpec], memory, irq_fds: dict[str, int],
                 add_doorbell: Callable[[Route], int], *, block_queues: int = 1,
                 console_path: str | None = None, input_fd: int | None = None):
        if not 1 <= block_queues <= MAX_QUEUES:
            raise UsageError(f"a disk has 1 to {MAX_QUEUES} queues, not {block_queues}")
        self.devices: list[VirtioDevice] = []
        self.block_queues = block_queues
        try:
            for index, spec in enumerate(specs):
                base, _gsi = layout.virtio_slot(index)
                notify = [add_doorbell(Route(SPACE_MMIO, base + mmio_registers.QUEUE_NOTIFY, 4, ACTION_IOEVENTFD,
                                             datamatch=queue))
                          for queue in range(spec.queue_count(block_queues))]
                self.devices.append(VirtioDevice(spec, memory, irq_fds[spec.name], notify,
                                                 block_queues=block_queues, console_path=console_path,
                                                 input_fd=input_fd if spec.kind == "console" else None))
        except BaseException:
            self.close()
            raise

    def register_links(self) -> list[tuple[str, int, int]]:
        """(name, window base, link fd) of each device, for the device model's bus."""
        return [(device.spec.name, layout.virtio_slot(index)[0], device.link.fileno())
                for index, device in enumerate(self.devices)]

    def dead(self) -> tuple[str, str] | None:
        """(name, how it ended) of the first device process that is gone, or None."""
        for device in self.devices:
            if not device.alive():
                return device.spec.name, device.describe_exit()
        return None

    def stats(self) -> dict[str, dict]:
        """Each live device's counters, by name; a device that does not answer is left out."""
        out = {}
        for device in self.devices:
            try:
                out[device.spec.name] = device.request({"op": "stats"})
            except DeviceModelError:
                pass
        return out

    def describe(self) -> dict | None:
        """The devices as a snapshot's machine record keeps them (None without any): what a restore builds."""
        if not self.devices:
            return None
        return {"devices": [{"name": d.spec.name, "kind": d.spec.kind, "path": d.spec.path,
                             "read_only": d.spec.read_only} for d in self.devices],
                "block_queues": self.block_queues}

    def save_state(self) -> dict[str, dict]:
        """Each device's state record, by name (the vCPUs are paused)."""
        states = {}
        for device in self.devices:
            reply = device.request({"op": "save_state"})
            if reply.get("op") != "state":
                raise DeviceModelError(f"virtio device {device.spec.name} did not save its state: "
                                       f"{reply.get('message', reply)}")
            states[device.spec.name] = reply["state"]
        return states

    def restore_state(self, states: dict[str, dict]) -> None:
        """Give each device its saved record; StateError if the devices are not the saved ones."""
        names = [device.spec.name for device in self.devices]
        if sorted(states) != sorted(names):
            raise StateError(f"the saved virtio devices are {', '.join(sorted(states)) or 'none'}, "
                             f"this VM has {', '.join(names) or 'none'}")
        for device in self.devices:
            reply = device.request({"op": "restore_state", "state": states[device.spec.name]})
            if reply.get("op") != "restored":
                raise StateError(f"virtio device {device.spec.name} refused its saved state: "
                                 f"{reply.get('message', reply)}")

    def shutdown(self) -> dict[str, dict]:
        """Stop every device process; each one's last counters (those that answered)."""
        out = {}
        for device in self.devices:
            try:
                out[device.spec.name] = device.shutdown()
            except DeviceModelError:
                pass
        return out

    def __len__(self) -> int:
        return len(self.devices)

    def close(self) -> None:
        for device in self.devices:
            device.close()

    def __enter__(self) -> "VirtioDevices":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def config_of(described: dict | None) -> dict:
    """``describe()``'s record -> the RunConfig fields that build the same devices (a restore's)."""
    if described is None:
        return {"disks": (), "console_device": "uart", "rng": False, "block_queues": None}
    devices = described["devices"]
    return {"disks": tuple(d["path"] + (",readonly" if d["read_only"] else "") for d in devices if d["kind"] == "block"),
            "console_device": "virtio" if any(d["kind"] == "console" for d in devices) else "uart",
            "rng": any(d["kind"] == "entropy" for d in devices), "block_queues": described["block_queues"]}


def check_described(described: object) -> None:
    """StateError unless ``described`` is a ``describe()`` record (it comes from a file)."""
    devices = described.get("devices") if isinstance(described, dict) else None
    queues = described.get("block_queues") if isinstance(described, dict) else None
    if not isinstance(devices, list) or type(queues) is not int or not 1 <= queues <= MAX_QUEUES:
        raise StateError("the machine's virtio record is malformed")
    kinds = [d.get("kind") if isinstance(d, dict) else None for d in devices]
    order = sorted(kinds, key=("block", "console", "entropy").index) if set(kinds) <= {"block", "console", "entropy"} \
        else None
    if order != kinds or kinds.count("console") > 1 or kinds.count("entropy") > 1:
        raise StateError("the machine's virtio devices are not disks, then a console, then an entropy device")
    for device in devices:
        if device["kind"] == "block" and not isinstance(device.get("path"), str) or \
                not isinstance(device.get("read_only"), bool):
            raise StateError("a saved virtio disk has no path or read-only flag")
