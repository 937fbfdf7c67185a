"""One run of a VM from creation to teardown: what ``mpvmm start`` does.

Order of creation (undone in reverse by one ExitStack, whatever fails):
KVM, the metrics endpoint (bound first: a busy port creates nothing),
guest RAM, the guest image, the VM and its vCPUs, the per-vCPU stats
area, the device-model process and its queues, the vCPU workers. The run
ends when every vCPU has exited, when ``--seconds`` runs out or a stop
signal arrives (the guest is asked to finish, then forced after a grace
period), or when a vCPU faults or the device model dies.
"""

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from mpvmm.errors import UsageError
from mpvmm.kvm import bindings as kb
from mpvmm.kvm.system import Kvm
from mpvmm.metrics.exporter import MetricsExporter
from mpvmm.supervisor import limits
from mpvmm.supervisor.builtin_guest import BuiltinGuest, GuestCounts, min_memory
from mpvmm.supervisor.device_model import DeviceModelProcess
from mpvmm.supervisor.memory import GuestMemory, map_shared, unmap
from mpvmm.vcpu_worker.route_table import paravirt_routes
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.vcpu_worker import stats_page
from mpvmm.vcpu_worker.native import run_native
from mpvmm.vcpu_worker.process_worker import ProcessWorker
from mpvmm.vcpu_worker.python_loop import run_python
from mpvmm.vcpu_worker.worker import VcpuWorker, stop_and_join
from mpvmm.x86.usermode import write_boot_structures

# The loop each runner's workers run; "process" runs the Python loop in a
# forked process per vCPU, each with a VM of its own (process_worker.py).
RUNNERS = {"native": run_native, "python": run_python, "process": run_python}
STOP_GRACE_SECONDS = 3.0  # how long the guest gets to finish before vCPUs are forced off
FORCE_STOP_SECONDS = 5.0  # how long a forced worker gets to leave its loop
POLL_SECONDS = 0.05
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class RunConfig:
    cpus: int = 1
    memory: int = 256 << 20
    workload: str = "demo"
    seconds: float | None = None
    runner: str = "native"
    console: str | None = None
    # A Linux kernel instead of the built-in guest (linux_run.LinuxSupervisor).
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no /metrics endpoint (the CLI's default is 9477); 0: any free port


@dataclass
class VcpuResult:
    """What one vCPU did, as the VMM counted it and as the guest reports it."""

    index: int
    outcome: str
    outcome_value: int
    exits: dict[str, int]
    paths: dict[str, int]
    runs: int
    interrupted: int
    sync_latency_buckets: list[int]
    sync_latency_sum_seconds: float
    sleep_seconds: float
    posted_stalls: int
    guest: GuestCounts
    pid: int  # the process that ran the vCPU: the supervisor, or its own worker process
    cpu_seconds: float | None  # that worker process's CPU time (process runner only)


@dataclass
class RunResult:
    config: RunConfig
    exit_code: int
    status: str
    seconds: float
    vcpus: list[VcpuResult] = field(default_factory=list)
    device_model: dict = field(default_factory=dict)
    atomic_total: int = 0
    fault_registers: dict = field(default_factory=dict)


def validate(config: RunConfig, max_vcpus: int) -> None:
    """Refuse what cannot run, before anything is created."""
    if config.cpus < 1:
        raise UsageError(f"--cpus must be at least 1, not {config.cpus}")
    if config.cpus > max_vcpus:
        raise UsageError(f"--cpus {config.cpus} is more than KVM allows on this host ({max_vcpus})")
    if config.runner not in RUNNERS:
        raise UsageError(f"unknown runner {config.runner!r} (choose from {', '.join(RUNNERS)})")
    if config.seconds is not None and config.seconds < 0:
        raise UsageError(f"--seconds must not be negative, not {config.seconds:g}")
    needed = min_memory(config.cpus)
    if config.memory < needed:
        raise UsageError(
            f"--memory {config.memory >> 20} MiB is too small for the guest with {config.cpus} vCPUs "
            f"(needs at least {-(-needed >> 20)} MiB)"
        )
    limits.check_host(config.cpus, config.memory)


class _StopSignals:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag for the wait loop while installed."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class Supervisor:
    """Builds the VM of ``config``, runs it and returns what happened."""

    def __init__(self, config: RunConfig, on_started=None, on_stopped=None):
        self.config = config
        self.on_started = on_started  # called with the Supervisor once vCPUs run
        # Called with the Supervisor once every vCPU has stopped, before the
        # device model shuts down and /metrics stops reading the VM.
        self.on_stopped = on_stopped
        self.metrics: MetricsExporter | None = None
        self.workers: list[VcpuWorker] = []
        self.vm: VirtualMachine | None = None
        self.device_model: DeviceModelProcess | None = None
        self.guest: BuiltinGuest | None = None
        self.stop_signal: int | None = None

    def run(self) -> RunResult:
        """The whole run; the steps a guest kind changes are the methods below."""
        # Stop signals become a flag from the very start: one arriving while
        # the VM is being built must not kill the supervisor between creating
        # a name and unlinking it, or with the terminal in raw mode. The wait
        # loop sees the flag as soon as the vCPUs run and stops them cleanly.
        with _StopSignals() as signals:
            return self._run(signals)

    def _run(self, signals: "_StopSignals") -> RunResult:
        config = self.config
        with contextlib.ExitStack() as stack:
            kvm = stack.enter_context(Kvm())
            kvm.require_capabilities()
            validate(config, kvm.max_vcpus())
            self._check_guest()
            if config.metrics_port is not None:
                self.metrics = stack.enter_context(MetricsExporter(
                    config.metrics_addr, config.metrics_port, self._metrics_info()))
            memory = stack.enter_context(GuestMemory(config.memory))
            self._build_guest(stack, kvm, memory)
            stats_size = config.cpus * stats_page.STATS_AREA_STRIDE
            stats_base = map_shared(-1, stats_size)
            stack.callback(unmap, stats_base, stats_size)
            self.device_model = DeviceModelProcess(memory, config.cpus, config.console,
                                                   **self._device_model_options(stack))
            stack.callback(self.device_model.close)
            self.workers = self._create_workers(memory, stats_base)
            stack.callback(self._force_stop)
            if self.metrics:
                # Before the workers start: its vCPU ioctls would wait on running vCPUs.
                self.metrics.attach(self)
                stack.callback(self.metrics.detach)  # runs before the stats pages are unmapped
            started = time.monotonic()
            for worker in self.workers:
                worker.start()
            if self.on_started:
                self.on_started(self)
            status = self._wait(signals, started)
            seconds = time.monotonic() - started
            if self.on_stopped:
                self.on_stopped(self)
            if self.metrics:
                self.metrics.detach()  # the device model's control socket is _collect's from here
            return self._collect(status, seconds)

    # --- The steps a guest kind provides (LinuxSupervisor overrides them). ---

    def _check_guest(self) -> None:
        """Refuse a guest that cannot run, before anything is created."""

    def _metrics_info(self) -> dict[str, str]:
        config = self.config
        return {"cpus": str(config.cpus), "memory_bytes": str(config.memory),
                "runner": config.runner, "workload": config.workload}

    def _build_guest(self, stack: contextlib.ExitStack, kvm, memory) -> None:
        """Load the built-in guest and, for thread runners, the VM entering it at CPL 3."""
        self.guest = BuiltinGuest(memory, self.config.cpus, self.config.workload)
        write_boot_structures(memory)
        if self.config.runner != "process":  # worker processes build VMs of their own
            self.vm = VirtualMachine(kvm, memory, self.config.cpus)
            stack.callback(self.vm.close)
            for index in range(self.config.cpus):
                self.vm.enter_user_mode(index, *self.guest.entry_arguments(index))

    def _device_model_options(self, stack: contextlib.ExitStack) -> dict:
        """Extra DeviceModelProcess arguments: the built-in guest needs none."""
        return {}

    def _create_workers(self, memory, stats_base: int) -> list:
        routes = paravirt_routes()
        channels = self.device_model.channels
        stats = [stats_base + index * stats_page.STATS_AREA_STRIDE for index in range(self.config.cpus)]
        if self.config.runner == "process":
            return [ProcessWorker(index, memory, self.guest, stats[index], routes, channels[index])
                    for index in range(self.config.cpus)]
        loop = RUNNERS[self.config.runner]
        return [VcpuWorker(vcpu, stats[vcpu.index], routes, channels[vcpu.index], loop)
                for vcpu in self.vm.vcpus]

    # --- While it runs. ---

    def _wait(self, signals: _StopSignals, started: float) -> str:
        """Wait for the end of the run; returns why it ended."""
        deadline = None if self.config.seconds is None else started + self.config.seconds
        while True:
            ending = self._guest_ending()
            if ending is not None:
                self._force_stop()
                return ending
            if not self.device_model.alive():
                self._force_stop()
                return f"device model died ({self.device_model.describe_exit()})"
            if any(w.done and w.outcome[0] in ("fault", "error") for w in self.workers):
                self._force_stop()
                return "vcpu fault"
            if all(w.done for w in self.workers):
                return "guest exited"
            if signals.received is not None:
                self.stop_signal = signals.received
                self._finish_guest()
                return f"stopped by {signal.Signals(signals.received).name}"
            if deadline is not None and time.monotonic() >= deadline:
                self._finish_guest()
                return "time limit reached"
            time.sleep(POLL_SECONDS)

    def _guest_ending(self) -> str | None:
        """How the guest ended the run by itself, if it did (the built-in guest
        just exits its vCPUs, which the checks in _wait see)."""
        return None

    def _finish_guest(self) -> None:
        """Ask the guest to finish; force the vCPUs that do not in time."""
        self.guest.request_stop()
        end = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < end and not all(w.done for w in self.workers):
            if not self.device_model.alive():
                break
            time.sleep(POLL_SECONDS / 5)
        self._force_stop()

    def _force_stop(self) -> None:
        stop_and_join(self.workers, FORCE_STOP_SECONDS)

    # --- After it ran. ---

    def _collect(self, status: str, seconds: float) -> RunResult:
        device_stats = self.device_model.shutdown() if self.device_model.alive() else {}
        result = RunResult(self.config, 0, status, seconds, device_model=device_stats,
                           atomic_total=self.guest.atomic_total())
        for worker in self.workers:
            result.vcpus.append(self._vcpu_result(worker))
        result.exit_code, result.status = self._exit_code(result, status)
        return result

    def _vcpu_result(self, worker: VcpuWorker) -> VcpuResult:
        stats = worker.stats
        outcome, value = worker.outcome
        if outcome == "fault":
            value_name = kb.EXIT_REASON_NAMES.get(value, str(value))
            outcome = f"fault: {value_name}"
        return VcpuResult(
            index=worker.index,
            outcome=outcome,
            outcome_value=value,
            exits={kb.EXIT_REASON_NAMES.get(reason, str(reason)): count
                   for reason, count in enumerate(stats.exits) if count},
            paths=dict(zip(stats_page.PATHS, stats.paths)),
            runs=stats.runs,
            interrupted=stats.interrupted,
            sync_latency_buckets=list(stats.sync_latency_buckets),
            sync_latency_sum_seconds=stats.sync_latency_sum_ns / 1e9,
            sleep_seconds=stats.sleep_ns / 1e9,
            posted_stalls=stats.posted_stalls,
            guest=self.guest.counts(worker.index),
            pid=getattr(worker, "pid", 0) or os.getpid(),
            cpu_seconds=getattr(worker, "cpu_seconds", None),
        )

    def _fault_detail(self, worker, vcpu: VcpuResult) -> str:
        """What stopped a vCPU, in words, from its exit reason and kvm_run."""
        if vcpu.outcome == "error":
            return f"stopped: KVM_RUN failed: {os.strerror(vcpu.outcome_value)} (errno {vcpu.outcome_value})"
        reason = vcpu.outcome_value
        run = getattr(getattr(worker, "vcpu", None), "kvm_run", None)  # None for worker processes
        if reason == kb.KVM_EXIT_SHUTDOWN:
            return "stopped: triple fault (KVM_EXIT_SHUTDOWN)"
        if reason == kb.KVM_EXIT_FAIL_ENTRY:
            hardware = f" (hardware reason {run.fail_entry.hardware_entry_failure_reason:#x})" if run else ""
            return f"stopped: VM entry failed{hardware}"
        if reason == kb.KVM_EXIT_INTERNAL_ERROR:
            suberror = f" (suberror {run.internal.suberror})" if run else ""
            return f"stopped: KVM internal error{suberror}"
        return f"stopped: unexpected exit reason {kb.EXIT_REASON_NAMES.get(reason, reason)} ({reason})"

    def _exit_code(self, result: RunResult, status: str) -> tuple[int, str]:
        """0 clean, the guest's debug-exit status where it set one, 1 for a VM failure."""
        for worker, vcpu in zip(self.workers, result.vcpus):
            if worker.error is not None:
                return 1, f"vcpu {vcpu.index}: worker failed: {worker.error}"
            if vcpu.outcome.startswith("fault") or vcpu.outcome == "error":
                detail = self._fault_detail(worker, vcpu)
                if self.vm is not None:
                    result.fault_registers[vcpu.index] = self.vm.registers(vcpu.index)
                return 1, f"vcpu {vcpu.index} {detail}"
        if status.startswith("device model died"):
            return 1, status
        if self.stop_signal is not None:
            return 128 + self.stop_signal, status  # the shell's convention for "ended by a signal"
        for vcpu in result.vcpus:
            if vcpu.outcome == "exited" and vcpu.outcome_value:
                return vcpu.outcome_value & 0xFF, f"{status}; vcpu {vcpu.index} exited with status {vcpu.outcome_value}"
        return 0, status
