"""A virtio device's process: one ``MmioTransport`` served from an epoll loop.

Start contract: as the device model's (devicemodel/process.py), with its
own module. The supervisor starts ``python -m mpvmm.virtio_device <fd>``
with one end of a socketpair and every descriptor the device will use
(virtio_device/config.py lists them), sends ``configure``, and gets
``ready`` (or ``error``, and exit 1). The process maps guest RAM writable
(a virtio device writes used rings and read data into guest buffers), then
gives up everything else as the device model does: ``nobody``, no
capabilities, Landlock with nothing granted, and its own seccomp allow-list
(syscalls.py). It holds no file name: its disk or console is a descriptor
the supervisor opened.

One thread serves everything, so the transport (not thread-safe) has one
owner:

- a queue's ioeventfd (KVM signals it on a QueueNotify write of that
  queue's index, without an exit): ``transport.notify(index)``;
- the register link from the device model (register_link.py): reads are
  answered at once, writes done in order. After a write, every ready queue
  is looked at once: a kick the guest gave right after a posted register
  write (DRIVER_OK, QueueReady) can overtake that write, since the two come
  by different paths, and would find the queue not yet running;
- the control socket: ``stats``, ``shutdown`` (answered ``bye``);
- a console's terminal: input for the receive queue.

End of file on the control socket means the supervisor is gone: exit 0.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
from typing import Sequence

import msgpack

from mpvmm.devicemodel.host_console import HostConsole
from mpvmm.devicemodel.pc import eventfd_trigger
from mpvmm.devicemodel.process_setup import (ServerExit, close_all, control_socket, die_with_parent, read_control,
                                              run_server)
from mpvmm.devicemodel.sandbox import drop_privileges, map_guest_ram, restrict
from mpvmm.errors import DeviceModelError, StateError
from mpvmm.output import open_standard_fds
from mpvmm.stop_signals import ignore_stop_signals
from mpvmm.virtio import Block, Console, Entropy, GuestRam, MmioTransport, saved_state
from mpvmm.virtio.console import RECEIVE_QUEUE
from mpvmm.virtio_device import register_link
from mpvmm.virtio_device.config import SCHEMA_VERSION, DeviceConfig
from mpvmm.virtio_device.syscalls import ALLOWED_SYSCALLS

CONTROL_BUFFER_MAX = 1 << 20
CONTROL_READ_SIZE = 65536
INPUT_READ_SIZE = 4096
# Register packets taken from the link before the other descriptors get a turn.
LINK_BATCH = 64


def build_device(config: DeviceConfig, console: HostConsole | None):
    """The virtio device ``config`` asks for, over its inherited backing descriptor."""
    if config.kind == "block":
        mode = "rb" if config.read_only else "r+b"
        disk = open(config.backing_fd, mode, buffering=0)  # noqa: SIM115 -- kept open for the process's life
        return Block(disk, read_only=config.read_only, disk_id=config.disk_id, queues=config.queues)
    if config.kind == "console":
        return Console(out=console.write)
    return Entropy()


class VirtioDeviceServer:
    """Owns the control socket, guest RAM, the transport and every descriptor the device uses."""

    def __init__(self, control: socket.socket, parent: int):
        self.control = control
        self.parent = parent
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=CONTROL_BUFFER_MAX)
        self.config: DeviceConfig | None = None
        self.ram = None
        self.memory: GuestRam | None = None
        self.transport: MmioTransport | None = None
        self.console: HostConsole | None = None
        self._epoll: select.epoll | None = None
        self._queue_by_fd: dict[int, int] = {}
        self.link_packets = 0
        self._reported_needs_reset = 0
        self.input_bytes = 0

    # --- Control channel. ---

    def _send(self, message: dict) -> None:
        try:
            self.control.sendall(msgpack.packb(message))
        except OSError as err:
            raise ServerExit(0) from err

    def _read_control(self) -> None:
        if not read_control(self.control, self._unpacker, CONTROL_READ_SIZE):
            raise ServerExit(1)

    def _control_messages(self) -> None:
        try:
            messages = list(self._unpacker)
        except Exception as err:  # a corrupt stream cannot resynchronise
            raise ServerExit(1) from err
        for message in messages:
            op = message.get("op") if isinstance(message, dict) else None
            if op == "stats":
                self._send({"op": "stats", **self.stats()})
            elif op == "save_state":
                self._catch_up()  # what the guest asked before it was paused belongs to the state
                self._send({"op": "state", "state": saved_state.capture(self.transport)})
            elif op == "restore_state":
                self._restore(message.get("state"))
            elif op == "shutdown":
                if self.console is not None:
                    self.console.flush()
                self._send({"op": "bye", **self.stats()})
                raise ServerExit(0)
            else:
                self._send({"op": "error", "message": f"unknown control op {op!r}"})

    def _catch_up(self) -> None:
        """Serve register accesses and kicks still waiting: the vCPUs are paused, nothing more comes."""
        with contextlib.suppress(OSError):  # a link already closed: the device model is gone
            self._registers()
        for fd in self._queue_by_fd:
            self._kick(fd)

    def _restore(self, record: object) -> None:
        try:
            saved_state.restore(self.transport, record)
        except StateError as err:
            self._send({"op": "error", "message": f"{self.config.name}: {err}"})
            return
        # A chain offered just before the snapshot may have had its kick
        # still in the old process's eventfd: look at every ring once.
        for index, queue in enumerate(self.transport.queues):
            if queue.attached:
                self.transport.process_queue(index)
        self._send({"op": "restored"})

    def stats(self) -> dict:
        transport = self.transport
        return {
            "pid": os.getpid(),
            "name": self.config.name,
            "kind": self.config.kind,
            "transport": transport.stats.as_dict(),
            "queues": [queue.stats.as_dict() for queue in transport.queues],
            "device": transport.device.stats.as_dict(),
            "needs_reset_reason": transport.needs_reset_reason,
            "link_packets": self.link_packets,
            "input_bytes": self.input_bytes,
            "console": self.console.stats() if self.console is not None else None,
        }

    # --- Configure. ---

    def configure(self) -> None:
        while True:
            try:
                message = next(self._unpacker)
                break
            except StopIteration:
                self._read_control()
        try:
            self.config = DeviceConfig.from_message(message)
            self._open(self.config)
            confinement = drop_privileges()  # the uid first: changing it clears the parent-death signal
            if not die_with_parent(self.parent):
                raise ServerExit(0)
            confinement = restrict(confinement, allowed=ALLOWED_SYSCALLS)
        except (DeviceModelError, OSError, ValueError) as err:
            self._send({"op": "error", "message": f"virtio device configure failed: {err}"})
            raise ServerExit(1) from err
        self._send({"op": "ready", "pid": os.getpid(), "version": SCHEMA_VERSION,
                    "sandbox": confinement.as_message()})

    def _open(self, config: DeviceConfig) -> None:
        try:
            self.ram = map_guest_ram(config.ram_fd, config.ram_size, writable=True)
        finally:
            os.close(config.ram_fd)
        self.memory = GuestRam(self.ram, config.regions)
        if config.kind == "console":
            self.console = HostConsole(config.backing_fd, owns_fd=True)
        device = build_device(config, self.console)
        self.transport = MmioTransport(device, self.memory, trigger=eventfd_trigger(config.irq_fd))
        if len(config.notify_fds) != len(self.transport.queues):
            raise DeviceModelError(f"a {config.kind} device has {len(self.transport.queues)} queues, "
                                   f"configure gave {len(config.notify_fds)} notify fds")
        os.set_blocking(config.registers_fd, False)
        self._epoll = select.epoll()
        self._epoll.register(self.control.fileno(), select.EPOLLIN)
        self._epoll.register(config.registers_fd, select.EPOLLIN)
        for index, fd in enumerate(config.notify_fds):
            self._queue_by_fd[fd] = index
            self._epoll.register(fd, select.EPOLLIN)
        if config.input_fd is not None:
            self._epoll.register(config.input_fd, select.EPOLLIN)

    # --- Serving. ---

    def loop(self) -> None:
        control_fd, link_fd, input_fd = self.control.fileno(), self.config.registers_fd, self.config.input_fd
        self._control_messages()  # what came with configure
        while True:
            if self.console is not None:
                self.console.flush()  # about to sleep: show what the guest wrote
            self._report_needs_reset()
            for fd, _mask in self._epoll.poll(-1):
                if fd in self._queue_by_fd:
                    self._kick(fd)
                elif fd == link_fd:
                    self._registers()
                elif fd == control_fd:
                    self._read_control()
                    self._control_messages()
                elif fd == input_fd:
                    self._terminal_input()

    def _report_needs_reset(self) -> None:
        """Say once on stderr why the device stopped: the guest's driver may only hang, silently."""
        needs = self.transport.stats.needs_reset
        if needs != self._reported_needs_reset:
            self._reported_needs_reset = needs
            with contextlib.suppress(OSError):
                os.write(2, f"mpvmm: virtio {self.config.name}: the device needs a reset (the guest broke a "
                            f"rule): {self.transport.needs_reset_reason}\n".encode())

    def _kick(self, fd: int) -> None:
        kicks = _eventfd_count(fd)  # resets it: one look at the queue serves every kick
        if kicks:
            self.transport.notify(self._queue_by_fd[fd], kicks)

    def _registers(self) -> None:
        """Serve the register accesses waiting on the link; then look at every ready queue once."""
        wrote = False
        for _ in range(LINK_BATCH):
            try:
                packet = os.read(self.config.registers_fd, register_link.REQUEST.size + 1)
            except BlockingIOError:
                break
            except OSError:
                packet = b""
            if not packet:  # the device model is gone: the supervisor ends the VM
                self._epoll.unregister(self.config.registers_fd)
                break
            self.link_packets += 1
            answer = register_link.serve(packet, self.transport.read, self.transport.write)
            wrote |= answer is None
            if answer is not None:
                with contextlib.suppress(OSError):
                    os.write(self.config.registers_fd, answer)
        if wrote and self.transport.running:
            for index, queue in enumerate(self.transport.queues):
                if queue.attached:
                    self.transport.process_queue(index)

    def _terminal_input(self) -> None:
        try:
            data = os.read(self.config.input_fd, INPUT_READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # hung up: no more input
            self._epoll.unregister(self.config.input_fd)
            return
        self.input_bytes += len(data)
        self.transport.device.enqueue_input(data)
        self.transport.process_queue(RECEIVE_QUEUE)

    def close(self) -> None:
        closers = [self.console.close] if self.console is not None else []
        closers += [c.close for c in (self.memory, self.ram, self._epoll) if c is not None]
        closers.append(self.control.close)
        close_all(closers, (OSError, ValueError, BufferError))

    def run(self) -> int:
        return run_server(self.configure, self.loop, self.close)


def _eventfd_count(fd: int) -> int:
    """The kicks an ioeventfd counted since it was last read (0 if none), and the count reset.

    Several kicks that came while the process was busy arrive as one wake-up
    with their sum: each is a notification the guest made.
    """
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def main(argv: Sequence[str]) -> int:
    """``python -m mpvmm.virtio_device <control_fd> [name]``; returns the exit status.

    The name (the device's, e.g. disk0) is only there for ``ps`` and traces.
    """
    if len(argv) not in (1, 2) or not argv[0].isdigit():
        print("usage: python -m mpvmm.virtio_device <control_fd> [name]", file=sys.stderr)
        return 2
    parent = os.getppid()
    open_standard_fds()
    ignore_stop_signals()  # started with them blocked: the supervisor's to handle
    control = control_socket(argv[0], "mpvmm virtio device")
    return 2 if control is None else VirtioDeviceServer(control, parent).run()
