"""A VM arriving from another VMM: ``mpvmm start --incoming tcp:HOST:PORT`` (or ``unix:PATH``).

``IncomingSource.accept`` binds the address (a busy one is exit 2), waits
for one connection and reads the source's hello: the machine to build and
how guest RAM comes (pages, or, over a Unix socket, its file descriptor).
The supervisor builds that machine as for any other guest; then the
``IncomingGuest``'s ``restore`` says "ready", takes the pages of every
round straight into guest RAM, and, once the source has paused its VM and
sent the rest, applies the vCPU, VM and device state. ``started`` tells the
source the VM runs here. Anything wrong before that (the source gone, a
corrupt record, a cancel) is a MigrationError: the run ends with exit 1
and leaves nothing.
"""

from __future__ import annotations

import select
import signal
import time
from collections.abc import Callable

from mpvmm.errors import Interrupted, MigrationError, MpvmmError, StateError
from mpvmm.migration import address as addresses
from mpvmm.migration.stream import VERSION, Stream
from mpvmm.snapshot import records
from mpvmm.snapshot.machine_state import MachineState, check_machine
from mpvmm.snapshot.restore import RestoredGuest, SavedMachineSource, attach_guest, check_guest, check_state
from mpvmm.supervisor.guest_memory import GuestMemory

ACCEPT_POLL_SECONDS = 0.1
# The state records that end a stream, in MachineState.to_records' order.
STATE_RECORDS = (records.MACHINE, records.VCPU, records.VM, records.DEVICE)


def _wait_for_connection(listener: addresses.Listener, cancelled: Callable[[], int | None]):
    while True:
        signum = cancelled()
        if signum:
            raise Interrupted(signum, f"waiting for a VM on {listener.address}")
        ready, _, _ = select.select([listener.sock], [], [], ACCEPT_POLL_SECONDS)
        if ready:
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            return sock, peer


class IncomingSource(SavedMachineSource):
    """The VM a source offered: its machine, and the connection the rest comes over."""

    def __init__(self, stream: Stream, hello: dict, peer: str, memory_fd: int | None):
        super().__init__(hello["machine"])
        self.stream = stream
        self.hello = hello
        self.peer = peer
        self.memory_fd = memory_fd

    @classmethod
    def accept(cls, text: str, cancelled: Callable[[], int | None]) -> "IncomingSource":
        listener = addresses.Listener(addresses.parse(text))
        try:
            sock, peer = _wait_for_connection(listener, cancelled)
        finally:
            listener.close()  # one VM per --incoming
        stream = Stream(sock, "source", lambda: _stop_reason(cancelled()))
        try:
            _kind, hello = stream.expect(records.HELLO)
            memory_fd = cls._check_hello(hello, stream)
        except MpvmmError as err:
            _refuse(stream, err)
            raise MigrationError(f"refused the VM from {_peer_name(peer) or text}: {err}") from None
        return cls(stream, hello, _peer_name(peer) or text, memory_fd)

    @staticmethod
    def _check_hello(hello: dict, stream: Stream) -> int | None:
        if hello.get("version") != VERSION:
            raise MigrationError(f"migration stream version {hello.get('version')!r}; this mpvmm speaks {VERSION}")
        try:
            check_guest(check_machine(hello.get("machine")))
        except StateError as err:
            raise MigrationError(str(err)) from None
        if hello.get("memory") == "fd":
            fd = stream.take_fd()
            if fd is None:
                raise MigrationError("guest RAM was to come as a file descriptor, and none came")
            return fd
        if hello.get("memory") != "pages":
            raise MigrationError(f"guest RAM is to come as {hello.get('memory')!r}, which this mpvmm does not take")
        return None

    def create_memory(self, size: int) -> GuestMemory:
        if self.memory_fd is None:
            return GuestMemory(size)
        fd, self.memory_fd = self.memory_fd, None
        return GuestMemory.adopt(fd, size)

    def load(self, memory) -> "IncomingGuest":
        return IncomingGuest(self, memory)

    def close(self, error: BaseException | None = None) -> None:
        """Tell the source why, if this end fails before the VM runs here; close the connection."""
        if error is not None:
            _refuse(self.stream, error)
        self.stream.close()


def _stop_reason(signum: int | None) -> str | None:
    return None if signum is None else f"stopped by {signal.Signals(signum).name}"


def _peer_name(peer) -> str:
    """host:port of a TCP peer; "" for a Unix socket's (unnamed) one."""
    if isinstance(peer, tuple):
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return peer or ""


def _refuse(stream: Stream, err: BaseException) -> None:
    """Say why to the peer, if it is still listening."""
    try:
        stream.send(records.CANCEL, {"reason": str(err) or type(err).__name__})
    except MigrationError:
        pass


class IncomingGuest(RestoredGuest):
    """The arriving guest: RAM and state come over ``source.stream``; the kind it was is known at the end."""

    def __init__(self, source: IncomingSource, memory):
        super().__init__(None, None)
        self.source = source
        self.memory = memory
        self.rounds: list[int] = []  # pages received in each round
        self.paused_at: float | None = None
        self.downtime_steps: dict[str, float] = {}
        self._step_started = 0.0

    def restore(self, vm, cancelled: Callable[[], int | None]) -> None:
        try:
            self._receive(vm)
        except MigrationError as err:
            raise MigrationError(f"the migration from {self.source.peer} failed before the VM started here: "
                                 f"{err}") from None

    def _receive(self, vm) -> None:
        started = time.monotonic()
        stream = self.source.stream
        stream.send(records.READY, {})
        items: list[tuple[int, dict]] = []
        pages = 0
        while True:
            kind, length, checksum = stream.receive_header()
            if kind == records.PAGES:
                pages += stream.receive_pages(length, checksum, self.memory) // 4096
                continue
            message = stream.receive_message(kind, length, checksum)
            if kind == records.ROUND:
                self.rounds.append(pages)
                pages = 0
                if self.paused_at is None:  # the source times the rounds it sends while the VM runs
                    stream.send(records.ROUND, {"pages": self.rounds[-1]})
            elif kind == records.PAUSED:
                self.paused_at = self._step_started = time.monotonic()
            elif kind in STATE_RECORDS and self.paused_at is not None:
                items.append((kind, message))
            elif kind == records.DONE and self.paused_at is not None:
                self._mark("receive")
                break
            elif kind == records.CANCEL:
                raise MigrationError(f"the source cancelled the migration: {message.get('reason', 'no reason')}")
            else:
                raise MigrationError(f"the source sent a {records.name(kind)} record out of turn")
        self._apply(vm, items)
        self.arrival = {"role": "destination", "from": self.source.peer,
                        "memory": "passed" if self.source.hello["memory"] == "fd" else "copied",
                        "rounds": len(self.rounds), "pages_per_round": self.rounds,
                        "receive_seconds": round(time.monotonic() - started, 6)}

    def _apply(self, vm, items: list[tuple[int, dict]]) -> None:
        try:
            state = MachineState.from_records(items)
            if state.machine != self.source.hello["machine"]:
                raise StateError("the machine in the state is not the one the source offered")
            check_state(state)
            self.inner = attach_guest(state.machine, self.memory)
        except StateError as err:
            raise MigrationError(f"the state the source sent is unusable: {err}") from None
        self.state = state
        self.stop_grace_seconds = self.inner.stop_grace_seconds
        self._mark("check")
        state.apply(vm)
        self._mark("apply")

    def _mark(self, step: str) -> None:
        """How long each step of this end's downtime took (milliseconds, in the report)."""
        now = time.monotonic()
        self.downtime_steps[step] = round((now - self._step_started) * 1000, 3)
        self._step_started = now

    def started(self) -> None:
        """Tell the source; if it cannot hear it any more, the VM runs here all the same.

        The downtime ends when the vCPUs were resumed, right after restore()
        returned. Woken, they can take every host CPU before this thread
        runs again to say so ("start", often a scheduler slice on a small
        host): the source subtracts that wait, the guest was running.
        """
        resumed_at = self._step_started
        self._mark("start")
        downtime_ms = round((resumed_at - self.paused_at) * 1000, 3)
        self.arrival.update(downtime_ms=downtime_ms, downtime_steps_ms=self.downtime_steps)
        try:
            self.source.stream.send(records.RESUMED, {"downtime_ms": downtime_ms, "steps": self.downtime_steps,
                                                      "told_after_ms": self.downtime_steps["start"]})
        except MigrationError:
            self.arrival["source_told"] = False
        self.source.stream.close()

    def describe(self) -> dict:
        return self.source.hello["machine"]["guest"] if self.inner is None else self.inner.describe()
