"""The supervisor's end of the device model: starting, talking to and stopping its process.

The supervisor starts ``python -m mpvmm.devicemodel`` with one end of a
socketpair and the file descriptors it needs: guest RAM's (guest RAM has no
name left to open), the eventfds of its interrupt lines and doorbells, the
vCPU fd whose mmap holds KVM's coalesced ring, and with the ring transport
the ring area's and the eventfd that wakes it (transport/ring.py: created
and unlinked before the spawn, like guest RAM). With the message-queue
transport it then creates each vCPU's request and reply queue (0600, random
names) and sends the names at once. The device model unlinks each name as
soon as it has opened it, and does so even if the supervisor has died
meanwhile: what was sent stays readable on the socket. So a name exists
only for the few milliseconds between its creation and its opening, nothing
is left in /dev/shm or /dev/mqueue whatever happens to either process, and
no other process can open a queue once the VM runs.
"""

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack
import posix_ipc

from mpvmm.errors import DeviceModelError, HostLimitError
from mpvmm.supervisor import limits
from mpvmm.supervisor.child_process import ChildProcess, receive_some, spawn
from mpvmm.supervisor.guest_memory import unique_name
from mpvmm.transport.channel import QueueChannel, RequestOrder, RingChannel, VcpuChannel
from mpvmm.transport.polling import poll_limit_seconds
from mpvmm.transport.ring import RingArea

START_TIMEOUT_SECONDS = 15.0
REPLY_TIMEOUT_SECONDS = 5.0
# While waiting for an answer, how often to look whether the process was stopped.
STOPPED_CHECK_SECONDS = 0.1


class DeviceModelClient(ChildProcess):
    """The device model of one VM (devicemodel/process.py) and the channels the vCPUs talk to it over.

    ``transport`` is "ring" or "mq" (transport/). ``machine``, ``irq_fds``
    (device name -> eventfd) and ``stdin_fd`` are the Linux machine's extras;
    ``doorbells`` ((eventfd, space, address) each) and ``coalesced_ring``
    ((vcpu fd, page offset), or None) the in-kernel routes'
    (supervisor/in_kernel.py). Every fd is inherited by the process.
    """

    _control: socket.socket | None = None
    _area: RingArea | None = None
    _wake_fd = -1

    def __init__(self, memory, cpus: int, console: str | None, *, transport: str = "mq",
                 machine: str = "builtin", irq_fds: dict[str, int] | None = None, stdin_fd: int | None = None,
                 doorbells: list[tuple[int, int, int]] | None = None,
                 coalesced_ring: tuple[int, int] | None = None, virtio_links: list[tuple[str, int, int]] = ()):
        # virtio_links: each virtio device's (name, window, register link).
        self.transport = transport
        self._extra = {"machine": machine, "irqfds": dict(irq_fds or {}), "stdin_fd": stdin_fd,
                       "doorbells": [list(d) for d in doorbells or []],
                       "coalesced_ring": list(coalesced_ring) if coalesced_ring else None,
                       "virtio_links": [list(link) for link in virtio_links]}
        self.system_events: list[str] = []
        # One conversation on the control socket at a time: a metrics scrape
        # (its own thread) and the wait loop's poll_events share it.
        self._lock = threading.Lock()
        self.channels: list[VcpuChannel] = []
        self._order = RequestOrder()  # the counter every channel stamps its requests from
        self._queues: list[posix_ipc.MessageQueue] = []
        self._unpacker = msgpack.Unpacker(raw=False)
        self.pid = 0
        try:
            self._start(memory, cpus, console)
        except BaseException:
            self.close()
            raise

    def _create_queue(self, role: str, depth: int) -> posix_ipc.MessageQueue:
        try:
            queue = posix_ipc.MessageQueue(
                unique_name(role), posix_ipc.O_CREX, mode=0o600,
                max_messages=depth, max_message_size=limits.QUEUE_MESSAGE_SIZE,
            )
        except (posix_ipc.Error, OSError) as err:
            raise HostLimitError(f"cannot create a message queue: {err} (see fs.mqueue sysctls)") from err
        self._queues.append(queue)
        return queue

    def _start(self, memory, cpus: int, console: str | None) -> None:
        inherited = [memory.fd, *self._extra["irqfds"].values(), *(d[0] for d in self._extra["doorbells"]),
                     *(fd for _name, _base, fd in self._extra["virtio_links"])]
        if self._extra["coalesced_ring"]:
            inherited.append(self._extra["coalesced_ring"][0])
        if self.transport == "ring":
            transport = self._create_rings(cpus)
            inherited += [transport["ring_fd"], transport["wake_fd"]]
        self._spawn(inherited)
        if self.transport == "mq":
            # The queues are created only now, with the device model already up
            # and reading: created earlier, they would be named (and leakable by
            # a SIGKILL) for the whole of its interpreter's start-up.
            transport = self._create_queues(cpus)
        self._send({
            "op": "configure",
            "version": 1,
            "ram_fd": memory.fd,
            "ram_size": memory.size,
            "console": os.path.abspath(console) if console else None,
            **transport,
            **self._extra,
        })
        reply = self._receive(START_TIMEOUT_SECONDS)
        if reply.get("op") != "ready":
            raise DeviceModelError(f"device model failed to start: {reply.get('message', reply)}")
        self.pid = reply.get("pid", self.process.pid)

    def _create_queues(self, cpus: int) -> dict:
        depth = limits.queue_depth()
        for index in range(cpus):
            requests = self._create_queue(f"req{index}", depth)
            replies = self._create_queue(f"rep{index}", depth)
            self.channels.append(QueueChannel(requests, replies, self._order))
        return {"transport": "mq",
                "request_queues": [c.request_queue.name for c in self.channels],
                "reply_queues": [c.reply_queue.name for c in self.channels]}

    def _create_rings(self, cpus: int) -> dict:
        self._area = RingArea.create(cpus)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.channels = [RingChannel(self._area.requests(i), self._area.replies(i), self._area.header, self._wake_fd,
                                     self._order)
                         for i in range(cpus)]
        return {"transport": "ring", "ring_fd": self._area.fd, "wake_fd": self._wake_fd,
                "poll_limit_seconds": poll_limit_seconds(cpus)}

    def _spawn(self, inherited: list[int]) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control = parent
        # The child's fd 0 is /dev/null (stdin=DEVNULL), so a terminal given
        # as fd 0 travels under a number of its own.
        terminal = os.dup(self._extra["stdin_fd"]) if self._extra["stdin_fd"] is not None else None
        if terminal is not None:
            self._extra["stdin_fd"] = terminal
        try:
            self.process = spawn("mpvmm.devicemodel", [str(child.fileno())],
                                 (child.fileno(), *inherited, *([terminal] if terminal is not None else [])))
        finally:
            child.close()
            if terminal is not None:
                os.close(terminal)

    # --- The control channel. ---

    def _send(self, message: dict) -> None:
        try:
            self._control.sendall(msgpack.packb(message))
        except OSError as err:
            raise DeviceModelError(f"device model is gone ({self.describe_exit()}): {err.strerror}") from err

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for message in self._unpacker:
                if isinstance(message, dict):
                    if message.get("op") == "system_event":  # unsolicited: kept for poll_events
                        self.system_events.append(str(message.get("event")))
                        continue
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceModelError(f"device model did not answer within {timeout:g} s ({self.describe_exit()})")
            if self.stopped():
                # It cannot answer until someone resumes it: waiting out the
                # timeout would only delay the end of the run (or a scrape).
                raise DeviceModelError("device model is stopped (SIGSTOP, or a debugger) and cannot answer")
            data = receive_some(self._control, min(left, STOPPED_CHECK_SECONDS), "device model", self.describe_exit)
            if data is not None:
                self._unpacker.feed(data)

    def stats(self) -> dict:
        """The device model's counters (devices, requests, coalesced, doorbells, unmapped, rejected,
        console), with its process's under ``process`` (the transport, the coalesced ring)."""
        with self._lock:
            self._send({"op": "stats"})
            return _counters(self._receive(REPLY_TIMEOUT_SECONDS))

    # Device state (snapshots, migration). The request goes out when the
    # block starts and the answer is read when it ends, so the device model
    # works while the caller reads or writes the vCPUs' state: part of a
    # migration's downtime.

    @contextlib.contextmanager
    def saving_state(self) -> Iterator[dict[str, dict]]:
        """Yields a dict that holds every device's state record, by device name, once the block ends."""
        with self._lock:
            self._send({"op": "save_state"})
            devices: dict[str, dict] = {}
            try:
                yield devices
            finally:
                reply = self._receive(REPLY_TIMEOUT_SECONDS)
        if reply.get("op") != "state" or not isinstance(reply.get("devices"), dict):
            raise DeviceModelError(f"device model did not save its state: {reply.get('message', reply)}")
        devices.update(reply["devices"])

    @contextlib.contextmanager
    def restoring_state(self, devices: dict[str, dict]) -> Iterator[None]:
        """Rebuild the device model's devices from saved records; done when the block ends.

        The block writes the rest of the machine (the vCPUs, the interrupt
        controllers). Terminal input and the RTC's timer wait until it has:
        an interrupt they raised before would be overwritten by the saved
        interrupt controllers.
        """
        with self._lock:
            self._send({"op": "restore_state", "devices": devices})
            try:
                yield
            finally:
                reply = self._receive(REPLY_TIMEOUT_SECONDS)
            if reply.get("op") != "restored":
                raise DeviceModelError(f"device model did not restore its state: {reply.get('message', reply)}")
            self._send({"op": "release"})  # no answer

    def shutdown(self) -> dict:
        """Ask the device model to drain, flush the console and exit; its last counters.

        A DeviceModelError if it does not answer within REPLY_TIMEOUT_SECONDS
        (it is stopped, or stuck); ``close`` then kills it.
        """
        with self._lock:
            self._send({"op": "shutdown"})
            reply = self._receive(REPLY_TIMEOUT_SECONDS)
        try:
            self.process.wait(REPLY_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return _counters(reply)

    def poll_events(self) -> list[str]:
        """Read what the device model sent unasked; the power events seen so far."""
        with self._lock:
            self._read_unsolicited()
        return self.system_events

    def _read_unsolicited(self) -> None:
        if self._control is not None:
            try:
                self._control.setblocking(False)
                data = self._control.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            finally:
                self._control.setblocking(True)
            if data:
                self._unpacker.feed(data)
                for message in self._unpacker:
                    if isinstance(message, dict) and message.get("op") == "system_event":
                        self.system_events.append(str(message.get("event")))

    # --- Teardown. ---

    def _unlink_queues(self) -> None:
        for queue in self._queues:
            try:
                queue.unlink()
            except posix_ipc.ExistentialError:
                pass

    def close(self) -> None:
        """Kill the process if still running, close every channel and unlink what is named. Idempotent."""
        self.kill()
        if self._control is not None:
            self._control.close()
            self._control = None
        self._unlink_queues()
        for queue in self._queues:
            try:
                queue.close()
            except posix_ipc.Error:
                pass
        self._queues = []
        if self._area is not None:
            self._area.close()
            self._area = None
        self._order.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def __enter__(self) -> "DeviceModelClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _counters(reply: dict) -> dict:
    """What a stats or bye answer counted: the devices', the console's, the terminal input's (if any)
    and the process's own under ``process`` (the transport, the coalesced ring)."""
    process = reply.get("process", {})
    counters = {**reply.get("stats", {}), "console": process.get("console", {}), "process": process}
    if process.get("terminal_input") is not None:
        counters["terminal_input"] = process["terminal_input"]
    return counters
