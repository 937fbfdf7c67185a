"""The device-model process: a control socket and a transport in front of DeviceModel.

Start contract (the supervisor's side):

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "mpvmm.devicemodel",
                             str(child.fileno())], pass_fds=(child.fileno(), ram_fd, ...))
    child.close()

Spawn it from the supervisor's main thread: PR_SET_PDEATHSIG fires when the
*thread* that forked the child exits, not only the process.

The control socket carries a stream of msgpack maps. The supervisor sends
``configure`` first; the process maps guest RAM from the inherited fd, opens
its end of the transport (every queue by name, unlinked at once; or the
ring area's fd), maps KVM's coalesced ring from the vCPU fd it was given,
then answers ``ready`` or ``error`` (and exits 1). It asks to die with the
supervisor only after that: a supervisor killed mid-start-up must not take
the device model with it before the names it sent are gone. Then ``stats``
is answered with ``stats``, ``save_state`` and ``restore_state`` carry the
devices' state records (after a restore, nothing raises an interrupt of its
own, neither terminal input nor the RTC's timer, until ``release``: the
supervisor is still writing the interrupt controllers, which would lose
it), and ``shutdown`` is answered with ``bye`` once the
requests and the coalesced ring are drained and the console flushed (exit
0). End of file means the supervisor is gone: exit 0.

One thread serves everything through epoll: the transport's descriptors
(message queues are pollable on Linux; the ring transport has one eventfd),
the control socket, the doorbells' eventfds and the terminal. Requests are
taken in rounds, and a read is answered only after every write then queued
by any vCPU, in a channel or in KVM's coalesced ring (rounds.py says why).
The coalesced ring is drained before every access the device model
performs and every doorbell, and at least every millisecond. The loop also
wakes for device timers (the RTC's update cycle). Nothing a guest sends can
end the loop.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import sys
import time
from typing import Sequence

import msgpack
import posix_ipc

from mpvmm.devicemodel.coalesced import DRAIN_INTERVAL_SECONDS, CoalescedRing
from mpvmm.devicemodel.config import Config
from mpvmm.devicemodel.host_console import HostConsole
from mpvmm.devicemodel.host_input import HostInput
from mpvmm.devicemodel.machine import DeviceModel
from mpvmm.devicemodel.machines import MachineBuilder
from mpvmm.devicemodel.pc import eventfd_trigger
from mpvmm.devicemodel.process_setup import (ServerExit, batch_scheduling, close_all, control_socket, die_with_parent,
                                              raise_fd_limit, read_control, run_server)
from mpvmm.devicemodel.protocol import SCHEMA_VERSION, Request, encode_reply
from mpvmm.devicemodel.sandbox import Confinement, drop_privileges, map_guest_ram, restrict
from mpvmm.errors import DeviceModelError
from mpvmm.output import open_standard_fds
from mpvmm.stop_signals import ignore_stop_signals
from mpvmm.transport.ring import RingArea
from mpvmm.transport.server import QueueServer, RequestServer, RingServer

# Control messages are small; more than this unread means a broken peer.
CONTROL_BUFFER_MAX = 1 << 20
CONTROL_READ_SIZE = 65536
STDOUT_FD = 1  # the console without --console: whatever the supervisor's stdout is


class DeviceModelServer:
    """Owns the control socket, guest RAM, the transport, the console and the model."""

    def __init__(self, control: socket.socket, parent: int):
        self.control = control
        self.parent = parent
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=CONTROL_BUFFER_MAX)
        self.ram: mmap.mmap | None = None
        self.requests: RequestServer | None = None
        self.coalesced: CoalescedRing | None = None
        self.doorbells: dict[int, tuple[int, int]] = {}  # eventfd -> (space, address)
        self.console: HostConsole | None = None
        self.model: DeviceModel | None = None
        self._epoll: select.epoll | None = None
        self.internal_errors = 0
        self.host_input: HostInput | None = None
        self._held = False  # restored, and the interrupt controllers not yet written: no timers
        self.confinement: Confinement | None = None

    # --- Control channel. ---

    def _send(self, message: dict) -> None:
        try:
            self.control.sendall(msgpack.packb(message))
        except OSError as err:  # the supervisor is gone: nobody to tell
            raise ServerExit(0) from err

    def _next_control_message(self) -> object:
        """Block until one whole control message arrives (configure phase)."""
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                self._read_control()

    def _read_control(self) -> None:
        if not read_control(self.control, self._unpacker, CONTROL_READ_SIZE):
            self._send({"op": "error", "message": "control message too large"})
            raise ServerExit(1)

    def _process_control_messages(self) -> None:
        try:
            messages = list(self._unpacker)
        except Exception as err:  # the stream is corrupt; it cannot resynchronise
            self._send({"op": "error", "message": f"bad control stream: {err}"})
            raise ServerExit(1) from err
        for message in messages:
            self._control_op(message)

    def _control_op(self, message: object) -> None:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "stats":
            self._send({"op": "stats", **self._stats()})
        elif op == "shutdown":
            self._drain_all()
            self.console.flush()
            self._send({"op": "bye", **self._stats()})
            raise ServerExit(0)
        elif op == "save_state":  # the vCPUs are paused: the queues hold only what came before
            self._drain_all()
            self._send({"op": "state", "devices": self.model.states()})
        elif op == "restore_state":
            self._restore_state(message.get("devices"))
        elif op == "release":  # the restored machine is whole: its devices may raise interrupts
            self._held = False
            if self.host_input is not None:
                self.host_input.release()
        elif op == "configure":
            self._send({"op": "error", "message": "already configured"})
        else:
            self._send({"op": "error", "message": f"unknown control op {op!r}"})

    def _stats(self) -> dict:
        return {
            "stats": self.model.stats(),
            "pid": os.getpid(),
            "process": {
                **self.requests.stats(),
                "internal_errors": self.internal_errors,
                "console": self.console.stats(),
                "coalesced_ring": self.coalesced.stats() if self.coalesced is not None else None,
                "terminal_input": self.host_input.stats() if self.host_input is not None else None,
            },
        }

    def _system_event(self, name: str) -> None:
        """A device asked for power-off or reboot: the supervisor ends the VM."""
        self.console.flush()
        self._send({"op": "system_event", "event": name})

    # --- Configure. ---

    def configure(self) -> None:
        """Read ``configure``, open everything, answer ``ready``."""
        message = self._next_control_message()
        try:
            config = Config.from_message(message)
            self._open(config)
            # Everything is open: give up what a hostile guest would want next
            # (sandbox.py). The uid first: changing it clears the parent-death signal.
            confinement = drop_privileges()
            if not die_with_parent(self.parent):  # only now: every name is unlinked
                raise ServerExit(0)  # the supervisor is gone already
            self.confinement = restrict(confinement)
        except (DeviceModelError, posix_ipc.Error, OSError, ValueError) as err:
            self._send({"op": "error", "message": f"device model configure failed: {err}"})
            raise ServerExit(1) from err
        self._send({"op": "ready", "pid": os.getpid(), "version": SCHEMA_VERSION,
                    "sandbox": self.confinement.as_message()})

    def _open(self, config: Config) -> None:
        try:
            size = os.fstat(config.ram_fd).st_size
        except OSError as err:
            raise DeviceModelError(f"cannot use guest RAM fd {config.ram_fd}: {err.strerror}") from err
        if size < config.ram_size:
            raise DeviceModelError(f"guest RAM fd {config.ram_fd} holds {size} bytes, configure says {config.ram_size}")
        # Kept mapped for the virtio devices to come; the fd is not needed.
        try:
            self.ram = map_guest_ram(config.ram_fd, config.ram_size, config.ram_writable)
        finally:
            os.close(config.ram_fd)
        self.requests = _open_transport(config)
        if config.console is None:
            self.console = HostConsole(STDOUT_FD, owns_fd=False)
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self.console = HostConsole(os.open(config.console, flags, 0o600), owns_fd=True)
        triggers = {name: eventfd_trigger(fd) for name, fd in config.irqfds}
        self._machine = MachineBuilder(config.machine, self.console.write, triggers, self._system_event,
                                       config.virtio_links)
        self.model = self._machine.build()
        if config.coalesced_ring is not None:
            self.coalesced = CoalescedRing.map(*config.coalesced_ring)
        self.doorbells = {fd: (space, address) for fd, space, address in config.doorbells}
        self._epoll = select.epoll()
        for fd in [self.control.fileno(), *self.requests.fds(), *self.doorbells]:
            self._epoll.register(fd, select.EPOLLIN)
        if config.stdin_fd is not None:
            self.host_input = HostInput(config.stdin_fd, self.model.uart, self._epoll)

    def _restore_state(self, devices: object) -> None:
        """Rebuild the machine from saved records (snapshots, migration); the old one stays if they are refused."""
        try:
            self.model = self._machine.build(devices if isinstance(devices, dict) else {})
        except (DeviceModelError, TypeError, ValueError) as err:
            self._send({"op": "error", "message": f"device state refused: {err}"})
            return
        if self.host_input is not None:
            self.host_input.move_to(self.model.uart)  # held until "release"
        self._held = True
        self._send({"op": "restored"})

    # --- Requests, doorbells and the coalesced ring (rounds.Device). ---

    def _drain_coalesced(self) -> None:
        if self.coalesced is not None:
            self.coalesced.drain(self.model.write_coalesced)

    def decode(self, record: bytes) -> Request | None:
        return self.model.decode(record)

    def perform(self, request: Request) -> bytes | None:
        # Every write KVM coalesced before this access comes first: a read
        # must see them, and a ring-full fallback must not overtake them.
        self._drain_coalesced()
        try:
            value = self.model.handle(request)
            return None if value is None else encode_reply(request.seq, value)
        except Exception:  # DeviceModel already guards; this is the last fence
            self.internal_errors += 1
            return None

    def _ring_doorbell(self, fd: int) -> None:
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            return  # read already, by the drain at shutdown
        self._drain_coalesced()  # what the guest wrote before it rang comes first
        self.model.doorbell(*self.doorbells[fd], count)

    def _drain_all(self) -> None:
        self._drain_coalesced()
        self.requests.drain(self)
        for fd in self.doorbells:
            self._ring_doorbell(fd)
        self._drain_coalesced()

    def loop(self) -> None:
        control_fd = self.control.fileno()
        # Messages that arrived with configure are already in the unpacker.
        self._process_control_messages()
        ready: set[int] = set()
        while True:
            self._drain_coalesced()  # at least once a DRAIN_INTERVAL_SECONDS: the epoll timeout
            if self.requests.serve(ready, self):
                timeout = 0.0
            elif self.requests.poll():
                ready = set()
                continue
            else:
                self.console.flush()  # about to sleep: show what the guest wrote
                if not self.requests.prepare_sleep():
                    ready = set()
                    continue
                timeout = self._sleep_timeout()
            ready = {fd for fd, _mask in self._epoll.poll(timeout)}
            self.requests.woke(ready)
            if not self._held:
                self.model.run_timers()
            for fd in ready:
                if self.host_input is not None and fd == self.host_input.fd:
                    self.host_input.on_readable()
                elif fd == control_fd:
                    self._read_control()
                    self._process_control_messages()
                elif fd in self.doorbells:
                    self._ring_doorbell(fd)
            if self.host_input is not None:
                self.host_input.feed()  # the guest may have read from the FIFO meanwhile

    def _sleep_timeout(self) -> float:
        """Seconds to sleep at most: until a device's next timer (the RTC's update
        cycle) or the next drain of the coalesced ring; -1 when neither is due."""
        deadline = None if self._held else self.model.timer_deadline()
        timer = None if deadline is None else max(0.0, deadline - time.time())
        drain = DRAIN_INTERVAL_SECONDS if self.coalesced is not None else None
        timeouts = [t for t in (timer, drain) if t is not None]
        return min(timeouts) if timeouts else -1

    def close(self) -> None:
        """Release everything opened so far; safe after a failed configure."""
        closers = [c.close for c in (self.console, self.requests, self.coalesced, self.ram, self._epoll)
                   if c is not None]
        closers += [lambda fd=fd: os.close(fd) for fd in self.doorbells]
        closers.append(self.control.close)
        close_all(closers, (OSError, posix_ipc.Error, ValueError, BufferError))

    def run(self) -> int:
        """Configure, serve until shutdown or EOF, close; returns the exit status."""
        return run_server(self.configure, self.loop, self.close)


def _open_transport(config: Config) -> RequestServer:
    """This end of the vCPUs' channels, as configure describes it."""
    if config.transport == "ring":
        try:
            area = RingArea.attach(config.ring_fd)
        except BaseException:
            os.close(config.ring_fd)
            os.close(config.wake_fd)
            raise
        return RingServer(area, config.wake_fd, config.poll_limit_seconds)
    return QueueServer(config.request_queues, config.reply_queues)


def main(argv: Sequence[str]) -> int:
    """``python -m mpvmm.devicemodel <control_fd>``; returns the exit status."""
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m mpvmm.devicemodel <control_fd>", file=sys.stderr)
        return 2
    parent = os.getppid()
    open_standard_fds()  # a closed stdout must not become a queue's number, then taken for the console
    raise_fd_limit()
    batch_scheduling()
    # Started with the stop signals blocked (device_model_client.py): the supervisor's to handle.
    ignore_stop_signals()
    control = control_socket(argv[0], "mpvmm device model")
    return 2 if control is None else DeviceModelServer(control, parent).run()
