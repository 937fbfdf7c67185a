"""One run of a VM from creation to teardown: what ``mpvmm start`` does.

``Supervisor.run`` builds the VM in one straight line, like Firecracker's
``builder.rs``: KVM, the control API socket, the guest source, the metrics
endpoint (bound early: a busy port or path creates nothing), guest RAM, the
guest, the VM and its vCPUs, the stats pages, the device-model process,
the vCPU runners; then the guest brings the VM to its saved state, if it
has one, and the vCPUs start. Everything is undone in reverse by one
ExitStack, whatever fails. What varies comes from the two objects
``choose`` picks once: the guest (guest.py: one that boots, a snapshot, or
a VM arriving from another VMM) and where the vCPUs run (vcpu_host.py).
The in-kernel routes its machine's devices declare are registered on the
VM(s) (in_kernel.py) before the device model starts, a restored or
arriving VM's as much as a new one's, and ``--transport`` decides how the
rest reaches it (its channels are always new: nothing of them is saved).
The run ends when the guest ends it, when every vCPU has exited, when
``--seconds`` runs out, a stop signal arrives or the API says stop (the
guest is asked to finish, then forced after a grace period), when the VM
migrated away, or when a vCPU fails or the device model dies (ending.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mpvmm.api.server import ControlApi, NoApi
from mpvmm.arguments import RUN_SECONDS_MAX, check_number, check_writable
from mpvmm.devicemodel.kernel_routes import kernel_routes
from mpvmm.errors import DeviceModelError, UsageError
from mpvmm.kvm import bindings as kb
from mpvmm.kvm.system import Kvm
from mpvmm.metrics.exporter import MetricsExporter
from mpvmm.migration.destination import IncomingSource
from mpvmm.snapshot.restore import SnapshotSource
from mpvmm.stop_signals import StopSignals
from mpvmm.supervisor import limits
from mpvmm.supervisor.builtin_guest import BuiltinGuestSource
from mpvmm.supervisor.control import VmControl
from mpvmm.supervisor.device_model_client import DeviceModelClient
from mpvmm.supervisor.ending import (DeviceModelDied, GuestEnded, GuestExited, MigratedAway, RunEnding, StopSignal,
                                     TimeLimit, VcpuFailed, device_model_ending, exit_status, status_line)
from mpvmm.supervisor.guest import Guest, GuestCounts, GuestSource
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.supervisor.in_kernel import InKernelRoutes
from mpvmm.supervisor.linux_guest import LinuxBoot
from mpvmm.supervisor.terminal import RawTerminal
from mpvmm.supervisor.vcpu_host import RUNNERS, VcpuHost
from mpvmm.transport import DEFAULT_TRANSPORT, TRANSPORTS
from mpvmm.vcpu_worker.outcome import VcpuOutcome
from mpvmm.vcpu_worker.route_table import machine_routes
from mpvmm.vcpu_worker.runner import VcpuRunner, VcpuSet
from mpvmm.vcpu_worker.stats_page import PATHS, StatsArea

POLL_SECONDS = 0.05


@dataclass
class RunConfig:
    cpus: int = 1
    memory: int = 256 << 20
    workload: str = "demo"
    seconds: float | None = None
    runner: str = "native"
    transport: str = DEFAULT_TRANSPORT  # how requests reach the device model: "ring" or "mq"
    console: str | None = None
    # A Linux kernel instead of the built-in guest (linux_guest.py).
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    metrics_addr: str = "127.0.0.1"
    metrics_port: int | None = None  # None: no /metrics endpoint (the CLI's default is 9477); 0: any free port
    dirty_rate: int | None = None  # the dirty workload's MiB/s (None: its default)
    # A VM that does not boot: one saved in a snapshot directory, or one
    # arriving at tcp:HOST:PORT or unix:PATH. It brings cpus, memory and its guest.
    restore: str | None = None
    incoming: str | None = None
    api_socket: str | None = None  # the control API's Unix socket (api/server.py)


@dataclass
class VcpuResult:
    """What one vCPU did, as the VMM counted it and as the guest reports it."""

    index: int
    outcome: VcpuOutcome
    exits: dict[str, int]
    paths: dict[str, int]
    runs: int
    interrupted: int
    sync_latency_buckets: list[int]
    sync_latency_sum_seconds: float
    sleep_seconds: float
    posted_stalls: int
    server_wakeups: int  # ring transport: times this vCPU woke the sleeping device model
    reply_sleeps: int  # ring transport: replies it slept for rather than spun
    guest: GuestCounts | None  # None: the guest keeps no counts for us (a kernel)
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
    atomic_total: int | None = 0
    fault_registers: dict = field(default_factory=dict)
    migration: dict | None = None  # how the VM left (source) or arrived (destination), if it moved
    # What could not be collected at the end, and why: "device_model" when
    # it had died or did not answer (stopped, stuck); its counts are missing.
    not_collected: dict[str, str] = field(default_factory=dict)
    # Output that could not be written (summary.with_output_errors): the
    # console, the summary, the report. Any makes a clean run's exit code 1.
    output_errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunningVm:
    """A built VM, as the run's callbacks, the metrics and the tests see it."""

    config: RunConfig
    memory: GuestMemory
    guest: Guest
    host: VcpuHost
    vcpus: VcpuSet
    device_model: DeviceModelClient
    metrics: MetricsExporter | None


def validate(config: RunConfig, max_vcpus: int) -> None:
    """Refuse what no guest can run, before anything is created."""
    if config.cpus < 1:
        raise UsageError(f"--cpus must be at least 1, not {config.cpus}")
    if config.cpus > max_vcpus:
        raise UsageError(f"--cpus {config.cpus} is more than KVM allows on this host ({max_vcpus})")
    if config.runner not in RUNNERS:
        raise UsageError(f"unknown runner {config.runner!r} (choose from {', '.join(RUNNERS)})")
    if config.transport not in TRANSPORTS:
        raise UsageError(f"unknown transport {config.transport!r} (choose from {', '.join(TRANSPORTS)})")
    if config.seconds is not None:
        check_number(config.seconds, "--seconds", 0, RUN_SECONDS_MAX)
    if config.console is not None:
        check_writable(config.console, "--console")
    limits.check_host(config.cpus, config.memory, message_queues=config.transport == "mq")


def choose(config: RunConfig, cancelled: Callable[[], int | None] = lambda: None) -> tuple[GuestSource, type[VcpuHost]]:
    """The guest and the vCPU host of ``config``, checked; the only place either is chosen.

    A restore reads and checks the whole snapshot here; an incoming VM is
    waited for here (until ``cancelled()`` names a stop signal).
    """
    host = RUNNERS[config.runner]
    if config.restore is not None or config.incoming is not None:
        if not host.has_machine_state:
            raise UsageError(f"--runner {config.runner} has a VM per vCPU and no one machine state to "
                             "bring back (use --runner native or python)")
        if config.restore is not None:
            return SnapshotSource.from_directory(config.restore), host
        return IncomingSource.accept(config.incoming, cancelled), host
    if config.kernel is None:
        if config.initrd is not None or config.cmdline is not None:
            raise UsageError("--initrd and --cmdline need --kernel")
        return BuiltinGuestSource(config.cpus, config.workload, config.memory, config.dirty_rate), host
    if not host.shares_interrupt_controller:
        raise UsageError(f"--runner {config.runner} has no shared interrupt controller and cannot boot Linux")
    return LinuxBoot.from_files(config.kernel, config.initrd, config.cmdline, config.cpus, config.memory), host


class Supervisor:
    """Builds the VM of ``config``, runs it and returns what happened.

    ``on_started(vm)`` is called with the RunningVm once its vCPUs run;
    ``on_stopped(vm)`` once every vCPU has stopped, before the device model
    shuts down and /metrics stops reading the VM. ``stdin_fd``, a terminal,
    feeds a guest whose machine takes host input.
    """

    def __init__(self, config: RunConfig, on_started: Callable[[RunningVm], None] | None = None,
                 on_stopped: Callable[[RunningVm], None] | None = None, stdin_fd: int | None = None):
        self.config = config
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.stdin_fd = stdin_fd

    def run(self, signals: StopSignals | None = None) -> RunResult:
        """Build, run and tear down the VM. ``signals``: a StopSignals already installed, else one of its own."""
        # Stop signals become a flag from the very start: one arriving while
        # the VM is being built must not kill the supervisor between creating
        # a name and unlinking it, or with the terminal in raw mode. The wait
        # loop sees the flag as soon as the vCPUs run and stops them cleanly.
        with contextlib.ExitStack() as stack:
            if signals is None:
                signals = stack.enter_context(StopSignals())
            control = VmControl()
            vm, api = self._build(stack, signals, control)
            # The runners wait, up, while a restored or arriving guest writes its
            # saved state; resuming is then all that is left of its downtime.
            vm.vcpus.start(paused=True)
            vm.guest.restore(vm, signals.signal_received)
            started = time.monotonic()
            vm.vcpus.resume()
            vm.guest.started()
            control.running(vm)
            if self.on_started:
                self.on_started(vm)
            ending = self._wait(vm, signals, started, control, api)
            seconds = time.monotonic() - started
            if self.on_stopped:
                self.on_stopped(vm)
            if vm.metrics:
                vm.metrics.detach()  # the device model's control socket is _collect's from here
            return self._collect(vm, ending, seconds)

    def _build(self, stack: contextlib.ExitStack, signals: StopSignals,
               control: VmControl) -> tuple[RunningVm, ControlApi | NoApi]:
        """Every part of the VM, in order; each one's teardown on ``stack``."""
        config = self.config
        kvm = stack.enter_context(Kvm())
        kvm.require_capabilities()
        validate(config, kvm.max_vcpus())
        api = stack.enter_context(ControlApi(config.api_socket, control.status) if config.api_socket else NoApi())
        source, host_class = choose(config, signals.signal_received)
        stack.enter_context(source)
        config = source.machine_config(config)  # a restored or arriving VM brings its own machine
        validate(config, kvm.max_vcpus())  # that machine, against this host
        metrics = None
        if config.metrics_port is not None:
            metrics = stack.enter_context(MetricsExporter(config.metrics_addr, config.metrics_port, {
                "cpus": str(config.cpus), "memory_bytes": str(config.memory),
                "runner": config.runner, "transport": config.transport, "workload": source.workload}))
        memory = stack.enter_context(source.create_memory(config.memory))
        guest = source.load(memory)
        host = stack.enter_context(host_class(kvm, memory, guest, config.cpus))
        irq_fds = host.connect_irq_lines(source.machine.irq_lines)
        in_kernel = stack.enter_context(InKernelRoutes(host, machine_routes(kernel_routes(source.machine.name))))
        stats = stack.enter_context(StatsArea(config.cpus))
        terminal = stack.enter_context(RawTerminal(self.stdin_fd if source.machine.host_input else None))
        device_model = stack.enter_context(DeviceModelClient(
            memory, config.cpus, config.console, transport=config.transport, machine=source.machine.name,
            irq_fds=irq_fds, stdin_fd=terminal.input_fd, doorbells=in_kernel.doorbell_fds(),
            coalesced_ring=in_kernel.coalesced_ring()))
        vcpus = VcpuSet(host.create_runners(stats, in_kernel.routes, device_model.channels))
        stack.callback(vcpus.stop_and_join)
        vm = RunningVm(config, memory, guest, host, vcpus, device_model, metrics)
        if metrics:
            # Before the vCPUs start: opening a vCPU's stats fd would wait on a running vCPU.
            metrics.attach(vm, control.migration_report)
            stack.callback(metrics.detach)  # runs before the stats pages are unmapped
        return vm, api

    # --- While it runs. ---

    def _wait(self, vm: RunningVm, signals: StopSignals, started: float, control: VmControl,
              api: ControlApi | NoApi) -> RunEnding:
        """Wait for the end of the run, doing what the API asks; returns how it ended, every vCPU stopped."""
        deadline = None if self.config.seconds is None else started + self.config.seconds

        def abort() -> str | None:
            """Why a long command (a migration) must give up now, if it must."""
            ending = self._ended(vm)
            if signals.received is not None:
                ending = StopSignal(signals.received)
            return None if ending is None else f"the run is ending: {status_line(ending)}"

        while True:
            ending = self._ended(vm)
            if ending is not None:
                vm.vcpus.stop_and_join()
                return ending
            if vm.vcpus.all_done():
                return GuestExited()
            if signals.received is not None:
                self._finish(vm)
                return StopSignal(signals.received)
            if deadline is not None and time.monotonic() >= deadline:
                self._finish(vm)
                return TimeLimit()
            command = api.next_command(POLL_SECONDS)
            ending = control.execute(command, abort) if command is not None else None
            if isinstance(ending, MigratedAway):
                vm.vcpus.stop_and_join()  # paused; guest RAM is the destination's now
                return ending
            if ending is not None:
                self._finish(vm)
                return ending

    @staticmethod
    def _ended(vm: RunningVm) -> RunEnding | None:
        """What ended the run early, if something did: the guest, the device model or a vCPU."""
        if vm.device_model.alive():
            events = vm.device_model.poll_events()
            if events:
                return device_model_ending(events[0])
        for runner in vm.vcpus:
            outcome = runner.outcome()
            event = vm.guest.ending(outcome) if outcome is not None else None
            if event is not None:
                return GuestEnded(event, runner.index)
        if not vm.device_model.alive():
            return DeviceModelDied(vm.device_model.describe_exit())
        if vm.vcpus.failed():
            return VcpuFailed()
        return None

    @staticmethod
    def _finish(vm: RunningVm) -> None:
        """Ask the guest to finish; force the vCPUs that do not in time.

        No grace while the device model is dead or stopped: a vCPU waiting
        for its answer could not finish anyway.
        """
        vm.vcpus.resume()  # a paused guest cannot finish by itself
        vm.guest.request_stop()
        end = time.monotonic() + vm.guest.stop_grace_seconds
        while (time.monotonic() < end and not vm.vcpus.all_done() and vm.device_model.alive()
               and not vm.device_model.stopped()):
            time.sleep(POLL_SECONDS / 5)
        vm.vcpus.stop_and_join()

    # --- After it ran. ---

    def _collect(self, vm: RunningVm, ending: RunEnding, seconds: float) -> RunResult:
        device_stats, not_collected = {}, {}
        try:
            if not vm.device_model.alive():
                raise DeviceModelError(f"device model gone ({vm.device_model.describe_exit()})")
            device_stats = vm.device_model.shutdown()
        except DeviceModelError as err:
            # Dead, stopped or stuck: what it counted is lost, the rest of the
            # result is not. The ExitStack kills it (close) if it is still there.
            not_collected["device_model"] = str(err)
        outcomes = [runner.outcome() for runner in vm.vcpus]
        code, status, fault_registers = exit_status(ending, outcomes)
        migration = ending.report if isinstance(ending, MigratedAway) else vm.guest.arrival
        return RunResult(vm.config, code, status, seconds,
                         vcpus=[_vcpu_result(runner, outcome, vm.guest) for runner, outcome in zip(vm.vcpus, outcomes)],
                         device_model=device_stats, atomic_total=vm.guest.atomic_total(),
                         fault_registers=fault_registers, migration=migration, not_collected=not_collected)


def _vcpu_result(runner: VcpuRunner, outcome: VcpuOutcome, guest: Guest) -> VcpuResult:
    stats = runner.stats
    return VcpuResult(
        index=runner.index,
        outcome=outcome,
        exits={kb.exit_reason_name(reason): count for reason, count in enumerate(stats.exits) if count},
        paths=dict(zip(PATHS, stats.paths)),
        runs=stats.runs,
        interrupted=stats.interrupted,
        sync_latency_buckets=list(stats.sync_latency_buckets),
        sync_latency_sum_seconds=stats.sync_latency_sum_ns / 1e9,
        sleep_seconds=stats.sleep_ns / 1e9,
        posted_stalls=stats.posted_stalls,
        server_wakeups=stats.server_wakeups,
        reply_sleeps=stats.reply_sleeps,
        guest=guest.counts(runner.index),
        pid=runner.pid,
        cpu_seconds=runner.cpu_seconds,
    )
