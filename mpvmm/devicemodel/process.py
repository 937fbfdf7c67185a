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
is answered with ``stats``, and ``shutdown`` with ``bye`` once the requests
and the coalesced ring are drained and the console flushed (exit 0). End of
file means the supervisor is gone: exit 0.

One thread serves everything through epoll: the transport's descriptors
(message queues are pollable on Linux; the ring transport has one eventfd),
the control socket, the doorbells' eventfds and the terminal. The coalesced
ring is drained before every request and doorbell, and at least every
millisecond. Nothing a guest sends can end the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import resource
import select
import signal
import socket
import sys
from typing import Sequence

import msgpack
import posix_ipc

from mpvmm.devicemodel.boards import build_machine
from mpvmm.devicemodel.coalesced import DRAIN_INTERVAL_SECONDS, CoalescedRing
from mpvmm.devicemodel.config import Config
from mpvmm.devicemodel.host_console import HostConsole
from mpvmm.devicemodel.host_input import HostInput
from mpvmm.devicemodel.machine import DeviceModel
from mpvmm.devicemodel.pc import eventfd_trigger
from mpvmm.devicemodel.protocol import SCHEMA_VERSION
from mpvmm.devicemodel.sandbox import confine
from mpvmm.errors import DeviceModelError
from mpvmm.transport.ring import RingArea
from mpvmm.transport.server import QueueServer, RequestServer, RingServer

# Control messages are small; more than this unread means a broken peer.
CONTROL_BUFFER_MAX = 1 << 20
CONTROL_READ_SIZE = 65536
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _Exit(Exception):
    """Leave the main loop with this exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _raise_fd_limit() -> None:
    """Two queue descriptors per vCPU: 512 vCPUs already pass the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass  # configure reports "Too many open files" if it comes to that


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill us when the supervisor goes, however it goes.

    If it went before we asked (we are an orphan already), leave now.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the control socket still ends us
    if os.getppid() != parent:
        raise _Exit(0)


def _batch_scheduling() -> None:
    """SCHED_BATCH: a posted write wakes us, but must not preempt the vCPU that sent it.

    As an ordinary task the device model, woken by every posted write, often
    preempted the sending vCPU thread on its own CPU (measured: ~0.5 forced
    context switches per exit on the 2-core development VM). A batch task is
    not given wake-up preemption; it runs when the vCPU blocks (every sync
    read does) or at the next tick, draining several writes at once. Measured
    there: pio-device 44.3 -> 37.8 us and uart 48.1 -> 38.6 us per exit.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass  # not Linux, or refused: ordinary scheduling still works


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

    # --- Control channel. ---

    def _send(self, message: dict) -> None:
        try:
            self.control.sendall(msgpack.packb(message))
        except OSError as err:  # the supervisor is gone: nobody to tell
            raise _Exit(0) from err

    def _next_control_message(self) -> object:
        """Block until one whole control message arrives (configure phase)."""
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                self._read_control()

    def _read_control(self) -> None:
        try:
            data = self.control.recv(CONTROL_READ_SIZE)
        except OSError as err:
            raise _Exit(0) from err
        if not data:
            raise _Exit(0)  # EOF: the supervisor is gone, quietly leave
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as err:
            self._send({"op": "error", "message": "control message too large"})
            raise _Exit(1) from err

    def _process_control_messages(self) -> None:
        try:
            messages = list(self._unpacker)
        except Exception as err:  # the stream is corrupt; it cannot resynchronise
            self._send({"op": "error", "message": f"bad control stream: {err}"})
            raise _Exit(1) from err
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
            raise _Exit(0)
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
            _die_with_parent(self.parent)  # only now: every name is unlinked
            confine()  # everything is open: give up what a hostile guest would want next
        except (DeviceModelError, posix_ipc.Error, OSError, ValueError) as err:
            self._send({"op": "error", "message": f"device model configure failed: {err}"})
            raise _Exit(1) from err
        self._send({"op": "ready", "pid": os.getpid(), "version": SCHEMA_VERSION})

    def _open(self, config: Config) -> None:
        try:
            size = os.fstat(config.ram_fd).st_size
        except OSError as err:
            raise DeviceModelError(f"cannot use guest RAM fd {config.ram_fd}: {err.strerror}") from err
        if size < config.ram_size:
            raise DeviceModelError(f"guest RAM fd {config.ram_fd} holds {size} bytes, configure says {config.ram_size}")
        # Kept mapped for the virtio devices to come; the fd is not needed.
        try:
            self.ram = mmap.mmap(config.ram_fd, config.ram_size)
        finally:
            os.close(config.ram_fd)
        self.requests = _open_transport(config)
        if config.console is None:
            self.console = HostConsole(sys.stdout.fileno(), owns_fd=False)
        else:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self.console = HostConsole(os.open(config.console, flags, 0o600), owns_fd=True)
        triggers = {name: eventfd_trigger(fd) for name, fd in config.irqfds}
        self.model = DeviceModel(machine=build_machine(config.machine, self.console.write, triggers,
                                                       self._system_event))
        if config.coalesced_ring is not None:
            self.coalesced = CoalescedRing.map(*config.coalesced_ring)
        self.doorbells = {fd: (space, address) for fd, space, address in config.doorbells}
        self._epoll = select.epoll()
        for fd in [self.control.fileno(), *self.requests.fds(), *self.doorbells]:
            self._epoll.register(fd, select.EPOLLIN)
        if config.stdin_fd is not None:
            self.host_input = HostInput(config.stdin_fd, self.model.uart, self._epoll)

    # --- Requests, doorbells and the coalesced ring. ---

    def _drain_coalesced(self) -> None:
        if self.coalesced is not None:
            self.coalesced.drain(self.model.write_coalesced)

    def _handle(self, index: int, message: bytes) -> bytes | None:
        # A read must see every earlier write of its vCPU, and a ring-full
        # fallback must not overtake the ring: drain it first, every time.
        self._drain_coalesced()
        try:
            return self.model.handle_message(message)
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
        self.requests.drain(self._handle)
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
            if self.requests.serve(ready, self._handle):
                timeout = 0.0
            elif self.requests.poll():
                ready = set()
                continue
            else:
                self.console.flush()  # about to sleep: show what the guest wrote
                if not self.requests.prepare_sleep():
                    ready = set()
                    continue
                timeout = DRAIN_INTERVAL_SECONDS if self.coalesced is not None else -1
            ready = {fd for fd, _mask in self._epoll.poll(timeout)}
            self.requests.woke(ready)
            for fd in ready:
                if self.host_input is not None and fd == self.host_input.fd:
                    self.host_input.on_readable()
                elif fd == control_fd:
                    self._read_control()
                    self._process_control_messages()
                elif fd in self.doorbells:
                    self._ring_doorbell(fd)
            if self.host_input is not None:
                self.host_input.rearm()

    def close(self) -> None:
        """Release everything opened so far; safe after a failed configure."""
        closers = [c.close for c in (self.console, self.requests, self.coalesced, self.ram, self._epoll)
                   if c is not None]
        closers += [lambda fd=fd: os.close(fd) for fd in self.doorbells]
        closers.append(self.control.close)
        for close in closers:
            # One failed close must not leave the rest open or change the exit status.
            with contextlib.suppress(OSError, posix_ipc.Error, ValueError, BufferError):
                close()

    def run(self) -> int:
        """Configure, serve until shutdown or EOF, close; returns the exit status."""
        try:
            self.configure()
            self.loop()
        except _Exit as done:
            return done.status
        finally:
            self.close()
        return 0


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
    _raise_fd_limit()
    _batch_scheduling()
    # Ctrl-C in the terminal reaches the whole process group; the supervisor
    # handles it and tells us to shut down, so we drain instead of dying.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        control = socket.socket(fileno=int(argv[0]))
    except OSError as err:
        print(f"mpvmm device model: control fd {argv[0]} is not a socket: {err}", file=sys.stderr)
        return 2
    control.setblocking(True)
    return DeviceModelServer(control, parent).run()
