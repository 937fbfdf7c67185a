"""Migrating a running VM away (``mpvmm ctl migrate URL``), on the run's main thread.

Over TCP, pre-copy as QEMU and Cloud Hypervisor do it: with dirty logging
on, every page that holds anything goes, then round after round the pages
the guest wrote meanwhile, until what is left would take no longer than the
downtime budget at the bandwidth the last round measured, or the time runs
out (then the migration is cancelled and the VM runs on here). Over a Unix
socket guest RAM's file descriptor goes instead and nothing is copied. Then
the VM is paused, the last pages, the vCPUs', VM's and devices' state are
sent, and the destination starts it. Downtime is pause to the destination's
"resumed".

Until the state is complete the destination starts nothing, so any failure
before that cancels cleanly: dirty logging off, the VM resumed. After it,
a lost answer leaves the VM paused here: the destination may be running it,
and two copies of one VM must never run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mpvmm.errors import MigrationError, MpvmmError
from mpvmm.migration import address as addresses
from mpvmm.migration.dirty_log import DirtyLog
from mpvmm.migration.stream import VERSION, Stream
from mpvmm.snapshot import records
from mpvmm.snapshot.machine_state import MachineState, describe_machine
from mpvmm.snapshot.ram import data_runs
from mpvmm.x86.layout import PAGE_SIZE

CONNECT_TIMEOUT_SECONDS = 5.0
CONNECT_RETRY_SECONDS = 0.05
PAUSE_TIMEOUT_SECONDS = 5.0


class MigrationOutcomeUnknown(MigrationError):
    """Everything was sent but the destination never said it runs the VM: it stays paused here."""


class Migration:
    """One attempt to move ``vm`` (a supervisor.run.RunningVm) to ``address``."""

    def __init__(self, vm, address: addresses.MigrationAddress, downtime_ms: float, timeout_s: float,
                 abort: Callable[[], str | None], max_bandwidth_mib_s: float | None = None):
        self.vm = vm
        self.address = address
        self.downtime_ms = downtime_ms
        self.timeout_s = timeout_s
        self.abort = abort
        # A link slower than loopback, as QEMU's max-bandwidth: pages are paced to it.
        self.max_bandwidth = None if max_bandwidth_mib_s is None else max_bandwidth_mib_s * 2**20
        self.memory = vm.memory
        self.rounds: list[dict] = []  # what each round sent, for the report and the status
        self.phase = "connecting"
        self._log: DirtyLog | None = None
        self._paused = False
        self.downtime_steps: dict[str, float] = {}
        self._step_started = 0.0
        self._deadline = float("inf")  # for the rounds sent while the VM runs

    def progress(self) -> dict:
        """The report's fields known while it runs (the API's status, the metrics)."""
        return {"role": "source", "to": str(self.address), "phase": self.phase, "rounds": len(self.rounds),
                "pages_per_round": [r["pages"] for r in self.rounds], "bytes": sum(r["bytes"] for r in self.rounds)}

    def run(self) -> dict:
        """Migrate; the report once the destination runs the VM. MigrationError: the VM runs here."""
        started = time.monotonic()
        sock = self._connect(started + CONNECT_TIMEOUT_SECONDS)
        stream = Stream(sock, "destination", self.abort)
        try:
            try:
                self._offer(stream)
                pending = self._precopy(stream) if not self.address.passes_memory else []
                paused_at = self._send_final(stream, pending)
            except BaseException as err:
                self._cancel(stream, err)
                if not isinstance(err, MpvmmError):
                    raise
                raise MigrationError(f"migration to {self.address} cancelled, the VM runs on here: {err}") from None
            try:
                _kind, resumed = stream.expect(records.RESUMED)
                self._mark("confirmed")
            except MigrationError as err:
                raise MigrationOutcomeUnknown(
                    f"the state went to {self.address} but it never confirmed ({err}); the VM stays "
                    "paused here: resume it only if the destination is not running it") from None
            # Pause to the destination's resume: not the time its answer waited after that.
            downtime = time.monotonic() - paused_at - resumed.get("told_after_ms", 0.0) / 1000
        finally:
            stream.close()
        self.vm.guest.hand_over()
        self.phase = "done"
        return self._report(time.monotonic() - started, downtime, resumed)

    # --- The steps. ---

    def _connect(self, deadline: float):
        """A connection to the destination, which may still be starting up (no listener yet)."""
        while True:
            try:
                return addresses.connect(self.address, CONNECT_TIMEOUT_SECONDS)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if time.monotonic() >= deadline:
                    raise MigrationError(f"cannot reach {self.address}: {err.strerror}") from None
                time.sleep(CONNECT_RETRY_SECONDS)
            except OSError as err:
                raise MigrationError(f"cannot reach {self.address}: {err.strerror or err}") from None

    def _offer(self, stream: Stream) -> None:
        hello = {"version": VERSION, "machine": describe_machine(self.vm),
                 "memory": "fd" if self.address.passes_memory else "pages"}
        if self.address.passes_memory:
            stream.send_with_fd(records.HELLO, hello, self.memory.fd)
        else:
            stream.send(records.HELLO, hello)
        self.phase = "waiting for the destination"
        stream.expect(records.READY)  # or its cancel, with the reason it will not take the VM

    def _precopy(self, stream: Stream) -> list[tuple[int, int]]:
        """Rounds of pages while the VM runs; returns the runs left for the paused round."""
        self.phase = "copying"
        self._deadline = time.monotonic() + self.timeout_s
        self._log = DirtyLog(self.vm.host.machine, self.memory)
        self._log.start()
        memory = self.memory
        self._send_round(stream, data_runs(memory.fd, memory.host_address, memory.size))
        while True:
            runs = self._log.collect()
            remaining = sum(length for _offset, length in runs)
            estimate_ms = remaining / self._bandwidth() * 1000
            if estimate_ms <= self.downtime_ms:
                return runs
            if time.monotonic() >= self._deadline:
                raise MigrationError(
                    f"it did not converge within {self.timeout_s:g} s: the guest dirtied {remaining // PAGE_SIZE} "
                    f"pages while round {len(self.rounds)} was sent, about {estimate_ms:.0f} ms to send, "
                    f"over the {self.downtime_ms:g} ms budget")
            self._send_round(stream, runs)

    def _send_round(self, stream: Stream, runs, acknowledged: bool = True) -> None:
        """Send ``runs``; with ``acknowledged``, wait until the destination has them all.

        A round is timed from its first page to the destination's answer,
        so the bandwidth is what actually got across, not what fitted in
        the socket's buffers (the scan for runs happens before).
        """
        runs = list(runs)
        sent = 0
        begun = time.monotonic()
        for offset, length in runs:
            reason = self.abort()
            if reason is not None:
                raise MigrationError(reason)
            if acknowledged and time.monotonic() >= self._deadline:
                raise MigrationError(f"it did not converge within {self.timeout_s:g} s: round "
                                     f"{len(self.rounds) + 1} was still being sent")
            stream.send_pages(offset, self.memory.host_address, length)
            sent += length
            if self.max_bandwidth is not None:
                time.sleep(max(0.0, begun + sent / self.max_bandwidth - time.monotonic()))
        self.rounds.append({"round": len(self.rounds) + 1, "pages": sent // PAGE_SIZE, "bytes": sent})
        stream.send(records.ROUND, self.rounds[-1])
        if acknowledged:
            stream.expect(records.ROUND)
        self.rounds[-1]["send_seconds"] = time.monotonic() - begun

    def _bandwidth(self) -> float:
        """Bytes per second the acknowledged rounds so far got across at (pages only, not the scans between)."""
        sent = sum(r["bytes"] for r in self.rounds if "send_seconds" in r)
        seconds = sum(r["send_seconds"] for r in self.rounds if "send_seconds" in r)
        return sent / seconds if sent and seconds > 0 else float("inf")

    def _send_final(self, stream: Stream, pending: list[tuple[int, int]]) -> float:
        """Pause, send what is left and the state; returns when the pause began."""
        self.phase = "paused"
        paused_at = self._step_started = time.monotonic()
        self._paused = True
        self.vm.vcpus.pause()
        if not self.vm.vcpus.wait_paused(PAUSE_TIMEOUT_SECONDS):
            raise MigrationError(f"the vCPUs did not pause within {PAUSE_TIMEOUT_SECONDS:g} s")
        self._mark("pause")
        stream.send(records.PAUSED, {})
        if self._log is not None:
            self._send_round(stream, pending + self._log.collect(), acknowledged=False)
            self._mark("last_round")
        state = MachineState.capture(self.vm)
        self._mark("capture")
        items = state.to_records()
        items.append((records.DONE, {"records": len(items), "rounds": len(self.rounds)}))
        stream.send_all(items)  # one write: the destination has it all at once
        self._mark("send_state")
        return paused_at

    def _mark(self, step: str) -> None:
        """How long each step of the downtime took (milliseconds, in the report)."""
        now = time.monotonic()
        self.downtime_steps[step] = round((now - self._step_started) * 1000, 3)
        self._step_started = now

    def _cancel(self, stream: Stream, err: Exception) -> None:
        """Tell the destination (it may be gone), stop logging, let the VM run on."""
        try:
            stream.send(records.CANCEL, {"reason": str(err)})
        except MigrationError:
            pass
        if self._log is not None:
            self._log.stop()
        if self._paused:
            self.vm.vcpus.resume()
        self.phase = "cancelled"

    def _report(self, seconds: float, downtime: float, resumed: dict) -> dict:
        return {
            **self.progress(),
            "memory": "passed" if self.address.passes_memory else "copied",
            "downtime_ms": round(downtime * 1000, 3),
            "destination_downtime_ms": resumed.get("downtime_ms"),
            "destination_downtime_steps_ms": resumed.get("steps"),
            "downtime_budget_ms": self.downtime_ms,
            "downtime_steps_ms": self.downtime_steps,
            "total_seconds": round(seconds, 6),
            "bandwidth_mib_s": None if self._bandwidth() == float("inf") else round(self._bandwidth() / 2**20, 1),
        }
