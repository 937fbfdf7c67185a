"""One measured run: a VM of one runner, its exits counted over a fixed window.

The ``native``, ``python`` and ``process`` runners are measured through
``Supervisor``, the code ``mpvmm start`` runs (with its /metrics endpoint on,
as ``mpvmm start`` has it by default, on any free port); ``raw`` through
``RawRun``. Both call ``on_started`` on the main thread once the vCPUs run,
and the whole window is measured inside that call: wait for every vCPU to be
online, optionally pin the vCPU threads, warm up, read every counter, wait
``seconds``, read them again, ask the guest to finish. Measuring there, not
on a thread of its own, means nothing reads the VM's memory once the run
starts tearing it down, whatever ends the run.
"""

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass

from mpvmm.errors import MpvmmError
from mpvmm.guest import abi
from mpvmm.kvm import bindings as kb
from mpvmm.stop_signals import STOP_SIGNALS
from mpvmm.supervisor.run import RunConfig, RunningVm, Supervisor
from mpvmm.transport import DEFAULT_TRANSPORT

RAW_RUNNER = "raw"  # the reference loop; every other runner is a --runner of mpvmm start
WARMUP_SECONDS = 0.25  # after every vCPU is online: past start-up, into the steady loop
ONLINE_TIMEOUT_SECONDS = 10.0
SLICE_SECONDS = 0.25  # how often the window looks for the run's end or a stop signal
# Past the window, the supervisor's own deadline: it finishes the guest itself
# if the window never asks (it always does; this is the safety net).
SAFETY_SECONDS = 30.0


class BenchRunError(MpvmmError):
    """A measured run did not end cleanly, so its figures mean nothing."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Snapshot:
    """Every counter of a running VM at one moment."""

    time: float
    exits: list[int]  # port-I/O + MMIO exits, per vCPU
    sync_buckets: list[int]  # sync round trips by latency bucket, all vCPUs
    sync_sum_ns: int
    guest_ops: dict[str, int]  # the guest's own counts, all vCPUs


@dataclass
class RunSample:
    """What one run did inside its window."""

    workload: str
    runner: str
    transport: str | None  # None for the raw loop, which has no device model
    cpus: int
    seconds: float
    exits: list[int]  # per vCPU
    sync_buckets: list[int]
    sync_sum_seconds: float
    guest_ops: dict[str, int]
    pinned_cpus: list[int] | None  # host CPU of each vCPU thread, None when not pinned


class _SupervisorProbe:
    """Reads a running VM's stats pages and guest reports."""

    def __init__(self, vm: RunningVm):
        self.vm = vm
        self.guest = vm.guest
        self.cpus = vm.config.cpus

    def snapshot(self) -> Snapshot:
        stats = [runner.stats for runner in self.vm.vcpus]
        now = time.monotonic()
        exits = [s.exits[kb.KVM_EXIT_IO] + s.exits[kb.KVM_EXIT_MMIO] for s in stats]
        buckets = [sum(column) for column in zip(*(s.sync_latency_buckets for s in stats))]
        return Snapshot(now, exits, buckets, sum(s.sync_latency_sum_ns for s in stats), _guest_ops(self))

    def tids(self) -> list[int]:
        return [runner.stats.tid for runner in self.vm.vcpus]

    def done(self) -> bool:
        """The run is ending: a vCPU left or the device model died (the supervisor says why)."""
        return any(runner.done for runner in self.vm.vcpus) or not self.vm.device_model.alive()

    def request_stop(self) -> None:
        self.guest.request_stop()  # the supervisor's wait loop forces what does not finish


class _RawProbe:
    """Reads a RawRun's control blocks and guest reports."""

    def __init__(self, raw_run):
        self.raw_run = raw_run
        self.guest = raw_run.guest
        self.cpus = raw_run.cpus

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        return Snapshot(now, self.raw_run.exits(), [], 0, _guest_ops(self))

    def tids(self) -> list[int]:
        return self.raw_run.tids()

    def done(self) -> bool:
        return any(v.done for v in self.raw_run.vcpus)

    def request_stop(self) -> None:
        self.raw_run.request_stop()


def _guest_ops(probe) -> dict[str, int]:
    counts = [probe.guest.counts(i).ops for i in range(probe.cpus)]
    return {op: sum(c[op] for c in counts) for op in abi.OPS}


def pin_plan(cpus: int) -> list[int] | None:
    """The host CPU for each vCPU thread, one each, or None where there are too few."""
    available = sorted(os.sched_getaffinity(0))
    return available[:cpus] if cpus <= len(available) else None


@contextlib.contextmanager
def _noticing_stop_signals(event: threading.Event):
    """Sets ``event`` on a stop signal, then hands the signal on to the Python handler in place.

    The supervisor's handler only records a signal for its wait loop, which
    does not run while the window is measured; this lets the window end at
    once so that loop can stop the VM. Signals with no Python handler are
    left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handle(signum, frame):
        event.set()
        previous[signum](signum, frame)

    try:
        for signum in STOP_SIGNALS:
            if callable(signal.getsignal(signum)):
                previous[signum] = signal.signal(signum, handle)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Window:
    """Measures one window of a running VM, on the thread that started it."""

    def __init__(self, probe, workload: str, runner: str, transport: str | None, seconds: float, pin: bool,
                 on_progress):
        self.probe = probe
        self.workload, self.runner, self.transport = workload, runner, transport
        self.seconds = seconds
        self.pin = pin
        self.on_progress = on_progress
        self.sample: RunSample | None = None
        self._stop_signal = threading.Event()

    def measure(self) -> None:
        """Measures, then asks the guest to finish, whatever happened."""
        try:
            with _noticing_stop_signals(self._stop_signal):
                self._measure()
        finally:
            self.probe.request_stop()

    def _wait(self, seconds: float) -> bool:
        """Sleeps; False when the run is ending or a stop signal came meanwhile."""
        time.sleep(seconds)
        return not self._stop_signal.is_set() and not self.probe.done()

    def _wait_online(self) -> bool:
        end = time.monotonic() + ONLINE_TIMEOUT_SECONDS
        while time.monotonic() < end:
            states = [self.probe.guest.counts(i).state for i in range(self.probe.cpus)]
            if all(s >= abi.REPORT_STATE_ONLINE for s in states) and all(self.probe.tids()):
                return True
            if not self._wait(0.01):
                return False
        raise BenchRunError(f"vCPUs not online within {ONLINE_TIMEOUT_SECONDS:g} s")

    def _measure(self) -> None:
        if not self._wait_online():
            return
        pinned = pin_plan(self.probe.cpus) if self.pin else None
        if pinned:
            for tid, cpu in zip(self.probe.tids(), pinned):
                os.sched_setaffinity(tid, {cpu})
        if not self._wait(WARMUP_SECONDS):
            return
        first = self.probe.snapshot()
        end = first.time + self.seconds
        while (left := end - time.monotonic()) > 0:
            if not self._wait(min(left, SLICE_SECONDS)):
                return
            if self.on_progress:
                self.on_progress(min(1.0, (time.monotonic() - first.time) / self.seconds))
        last = self.probe.snapshot()
        self.sample = RunSample(
            workload=self.workload, runner=self.runner, transport=self.transport, cpus=self.probe.cpus,
            seconds=last.time - first.time,
            exits=[b - a for a, b in zip(first.exits, last.exits)],
            sync_buckets=[b - a for a, b in zip(first.sync_buckets, last.sync_buckets)],
            sync_sum_seconds=(last.sync_sum_ns - first.sync_sum_ns) / 1e9,
            guest_ops={op: last.guest_ops[op] - first.guest_ops[op] for op in abi.OPS},
            pinned_cpus=pinned,
        )


def measure(workload: str, runner: str, cpus: int, seconds: float, *, transport: str | None = None,
            pin: bool = False, on_progress=None) -> RunSample:
    """Runs ``workload`` on ``cpus`` vCPUs with ``runner`` (and ``transport``) and measures ``seconds`` of it.

    ``on_progress(fraction)`` is called a few times a second during the window.
    """
    window: _Window | None = None
    transport = None if runner == RAW_RUNNER else transport or DEFAULT_TRANSPORT

    def started(probe) -> None:
        nonlocal window
        window = _Window(probe, workload, runner, transport, seconds, pin, on_progress)
        window.measure()

    what = f"{runner} runner{f' over {transport}' if transport else ''}, {workload}, {cpus} vCPUs"
    if runner == RAW_RUNNER:
        _run_raw(what, workload, cpus, started)
    else:
        _run_supervised(what, workload, runner, transport, cpus,
                        WARMUP_SECONDS + ONLINE_TIMEOUT_SECONDS + seconds + SAFETY_SECONDS, started)
    if window is None or window.sample is None:
        raise BenchRunError(f"{what}: the run ended before its window did")
    return window.sample


def _run_raw(what: str, workload: str, cpus: int, started) -> None:
    """The reference loop, KVM alone (raw.py); the window ends it."""
    from mpvmm.bench.raw import RawRun  # needs the native extension; keep --help free of it

    result = RawRun(cpus, workload, memory=RunConfig().memory, on_started=lambda run: started(_RawProbe(run))).run()
    if not result.ok:
        raise BenchRunError(f"{what}: {result.status}")


def _run_supervised(what: str, workload: str, runner: str, transport: str, cpus: int, limit: float,
                    started) -> None:
    """A run of ``mpvmm start``'s code, /metrics served on any free port as by default.

    ``limit`` is the run's own --seconds: a safety net, the window always ends it first.
    """
    config = RunConfig(cpus=cpus, workload=workload, runner=runner, transport=transport, console=os.devnull,
                       seconds=limit, metrics_port=0)
    result = Supervisor(config, on_started=lambda vm: started(_SupervisorProbe(vm))).run()
    if result.exit_code != 0:
        raise BenchRunError(f"{what}: {result.status}", result.exit_code)
