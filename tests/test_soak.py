"""The soak: VMs of random shapes, each ended by a random fault, with hostile /metrics clients.

Every cycle starts a VM (the built-in guest with any runner and workload,
hostile included, or a Linux kernel while it boots), lets it run a random
moment, then ends it one way: the guest asked to finish, the vCPUs forced,
the time limit, a stop signal, the device model or a worker process killed
or stopped (SIGSTOP), or `mpvmm start` itself signalled as a whole process
group at a random moment of its start-up. Meanwhile, in some cycles, local
clients misbehave on its /metrics endpoint. After every cycle:

- the outcome is the documented one for that fault (exit code, status,
  what the report marks as not collected);
- nothing hung: the run ended within SOAK_HANG_SECONDS of the fault
  (docs/reliability.md, "Bounds"), and every client thread ended;
- nothing leaked: no /dev/shm or /dev/mqueue entry, device model, child
  process, file descriptor or thread more than before the soak.

Transports: each cycle picks one, the shared-memory rings or POSIX
message queues, at random. Linux boots run on this host's KVM (to the banner and
early set-up here); boots under the nested-KVM harness join the soak when
that harness is in the tree.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from mpvmm.guest import abi
from mpvmm.supervisor.run import RunConfig, RunResult, Supervisor
from mpvmm.transport import TRANSPORTS
from mpvmm.vcpu_worker.outcome import Exited, Stopped
from tests.conftest import device_model_processes, ipc_objects, open_fds
from tests.metrics.hostile_clients import HostileClients
from tests.startup import StderrLines, import_time_env

MPVMM = [sys.executable, "-m", "mpvmm"]
SOAK_WORKLOADS = [w for w in abi.WORKLOADS if w not in abi.MISBEHAVING_WORKLOADS] + ["hostile"]
RUNNERS = ["native", "python", "process"]
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
# From a fault to the end of its run, whatever the fault: the worst documented
# case is a stopped worker process (3 s grace, then 5 s before it is killed),
# with room for a host loaded by other work. A cycle past it is a hang.
SOAK_HANG_SECONDS = 20
# `mpvmm start` in a subprocess: its interpreter starting and the VM's build.
CLI_START_SECONDS = 30
STOPPED_DEVICE_MODEL = "device model is stopped (SIGSTOP, or a debugger) and cannot answer"


@dataclass
class Shape:
    """One cycle's VM."""

    cpus: int
    runner: str
    workload: str
    kernel: str | None = None
    transport: str = "ring"

    def config(self, tmp_path, **extra) -> RunConfig:
        memory = 256 << 20 if self.kernel else 64 << 20
        workload = "demo" if self.kernel else self.workload  # a kernel has no workload to choose
        return RunConfig(cpus=self.cpus, memory=memory, workload=workload, runner=self.runner,
                         transport=self.transport, console=str(tmp_path / "console"), kernel=self.kernel, **extra)


@dataclass
class Cycle:
    """What one cycle did and saw, for its checks and its failure message."""

    number: int
    shape: Shape
    fault: str
    clients: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)
    injected_at: float | None = None


def random_shape(rng: random.Random, kernel: str) -> Shape:
    transport = rng.choice(TRANSPORTS)
    if rng.random() < 0.1:  # a Linux kernel while it boots: the pc machine, irqfds, no guest stop flag
        return Shape(cpus=rng.choice([1, 2]), runner=rng.choice(["native", "python"]), workload="linux",
                     kernel=kernel, transport=transport)
    return Shape(cpus=rng.choice([1, 2, 3, 4, 8]), runner=rng.choice(RUNNERS), workload=rng.choice(SOAK_WORKLOADS),
                 transport=transport)


# --- Faults. Each ends a running VM its own way (inject) and says what the run must report (check). ---


def _signal_self(signum: int) -> None:
    """A stop signal as `kill` would send it; the run's StopSignals is installed on this thread."""
    os.kill(os.getpid(), signum)


class Fault:
    weight = 1.0

    def applies(self, shape: Shape) -> bool:
        return True

    def seconds(self, rng: random.Random) -> float:
        return 30  # a safety net only: the fault ends the run long before

    def inject(self, vm, cycle: Cycle, rng: random.Random) -> None:
        raise NotImplementedError

    def check(self, result: RunResult, cycle: Cycle) -> None:
        raise NotImplementedError


def _clean(result: RunResult) -> None:
    assert result.exit_code == 0, result.status
    assert all(isinstance(v.outcome, Exited | Stopped) for v in result.vcpus)
    assert result.not_collected == {} and result.device_model["console"]["lost_bytes"] == 0


class GuestStop(Fault):
    """The guest is asked to finish its round and leave (the built-in guest has a stop flag)."""

    weight = 2.0

    def applies(self, shape):
        return shape.kernel is None

    def inject(self, vm, cycle, rng):
        vm.guest.request_stop()

    def check(self, result, cycle):
        _clean(result)


class ForcedStop(Fault):
    """Every vCPU kicked wherever it is: mid-exit, mid-sync-read, in KVM_RUN."""

    weight = 2.0

    def inject(self, vm, cycle, rng):
        for runner in vm.vcpus:
            runner.stop()

    def check(self, result, cycle):
        _clean(result)


class TimeLimit(Fault):
    def seconds(self, rng):
        return rng.uniform(0.1, 0.8)

    def inject(self, vm, cycle, rng):
        pass

    def check(self, result, cycle):
        _clean(result)
        assert result.status == "time limit reached"


class StopSignal(Fault):
    weight = 2.0

    def inject(self, vm, cycle, rng):
        cycle.details["signal"] = rng.choice(STOP_SIGNALS)
        _signal_self(cycle.details["signal"])

    def check(self, result, cycle):
        signum = cycle.details["signal"]
        assert result.exit_code == 128 + signum and result.status == f"stopped by {signal.Signals(signum).name}"
        assert result.not_collected == {}


class KilledDeviceModel(Fault):
    def inject(self, vm, cycle, rng):
        os.kill(vm.device_model.pid, signal.SIGKILL)

    def check(self, result, cycle):
        assert result.exit_code == 1 and result.status == "device model died (killed by signal 9)", result.status
        assert result.not_collected == {"device_model": "device model gone (killed by signal 9)"}


class StoppedDeviceModel(Fault):
    """SIGSTOP, then a stop signal: no grace and no answer waited for; the report says what is missing."""

    def inject(self, vm, cycle, rng):
        os.kill(vm.device_model.pid, signal.SIGSTOP)
        _wait_until(lambda: vm.device_model.stopped(), 2.0, "the device model did not stop")
        time.sleep(rng.uniform(0, 0.3))  # vCPUs now stall on it: reads unanswered, queues full
        cycle.details["signal"] = rng.choice(STOP_SIGNALS)
        _signal_self(cycle.details["signal"])

    def check(self, result, cycle):
        assert result.exit_code == 128 + cycle.details["signal"], result.status
        assert result.not_collected == {"device_model": STOPPED_DEVICE_MODEL}


class KilledWorker(Fault):
    """A worker process killed: the VM ends, naming its vCPU and the signal, exit 1."""

    sends = signal.SIGKILL

    def applies(self, shape):
        return shape.runner == "process"

    def inject(self, vm, cycle, rng):
        runner = rng.choice(vm.vcpus.runners)
        cycle.details["vcpu"] = runner.index
        os.kill(runner.pid, self.sends)

    def check(self, result, cycle):
        assert result.exit_code == 1, result.status
        assert f"vcpu {cycle.details['vcpu']}" in result.status and "killed by SIGKILL" in result.status


class StoppedWorker(KilledWorker):
    """A worker process stopped, then SIGTERM: it cannot finish, so it is killed after the force-stop time."""

    sends = signal.SIGSTOP
    weight = 0.3  # the slowest ending (3 s grace + 5 s): rare, but in every run of the soak

    def inject(self, vm, cycle, rng):
        super().inject(vm, cycle, rng)
        _signal_self(signal.SIGTERM)


FAULTS = {"guest-stop": GuestStop(), "forced-stop": ForcedStop(), "time-limit": TimeLimit(),
          "stop-signal": StopSignal(), "killed-device-model": KilledDeviceModel(),
          "stopped-device-model": StoppedDeviceModel(), "killed-worker": KilledWorker(),
          "stopped-worker": StoppedWorker()}
# `mpvmm start` signalled as a whole process group at a random moment of its life.
CLI = "cli-group-signal"


def random_fault(rng: random.Random, shape: Shape) -> str:
    if rng.random() < 0.1:
        return CLI
    names = [name for name, fault in FAULTS.items() if fault.applies(shape)]
    return rng.choices(names, weights=[FAULTS[name].weight for name in names])[0]


# --- Running cycles. ---


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def run_in_process(cycle: Cycle, tmp_path, rng: random.Random) -> None:
    """A Supervisor run in this process, the fault injected from its on_started, clients on /metrics."""
    fault = FAULTS[cycle.fault]
    with_clients = rng.random() < 0.4
    swarm: list[HostileClients] = []
    run_for = rng.uniform(0.05, 0.6)

    def started(vm):
        if with_clients:
            swarm.append(HostileClients(vm.metrics.port, rng))
            cycle.clients = swarm[0].kinds
        time.sleep(run_for)
        cycle.injected_at = time.monotonic()
        fault.inject(vm, cycle, rng)

    config = cycle.shape.config(tmp_path, seconds=fault.seconds(rng), metrics_port=0 if with_clients else None)
    try:
        result = Supervisor(config, on_started=started).run()
    finally:
        hung_clients = swarm[0].close() if swarm else []
    ended = time.monotonic()
    assert hung_clients == [], f"clients still running after the run: {hung_clients}"
    took = ended - (cycle.injected_at or ended)
    assert took < SOAK_HANG_SECONDS, f"the run ended {took:.1f} s after the fault"
    fault.check(result, cycle)


def run_cli(cycle: Cycle, tmp_path, rng: random.Random) -> None:
    """`mpvmm start` signalled as a process group (Ctrl-C, `timeout`) at a random moment from its first line.

    A signal while mpvmm loads ends it quietly, 128+N, with nothing created
    (only SIGTERM or SIGHUP in the few lines before the flag is installed
    take their default action, -N); once the run is built it is a clean
    stop, 128+N, with the summary and a complete report.
    """
    shape, report = cycle.shape, tmp_path / "report.json"
    signum = cycle.details["signal"] = rng.choice(STOP_SIGNALS)
    delay = cycle.details["delay"] = rng.uniform(0, 1.5)
    args = ["--cpus", str(shape.cpus), "--runner", shape.runner, "--transport", shape.transport,
            "--console", str(tmp_path / "console"), "--report", str(report), "--metrics-port", "0"]
    if shape.kernel:
        args += ["--kernel", shape.kernel, "--memory", "256M"]
    else:
        args += ["--workload", shape.workload, "--memory", "64M"]
    process = subprocess.Popen([*MPVMM, "start", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, env=import_time_env())
    try:
        stderr = StderrLines(process)
        stderr.wait_for_mpvmm_code(CLI_START_SECONDS)
        time.sleep(delay)
        cycle.injected_at = time.monotonic()
        os.killpg(process.pid, signum)
        code = cycle.details["exit"] = process.wait(SOAK_HANG_SECONDS)
        own = stderr.own(SOAK_HANG_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    name = signal.Signals(signum).name
    if report.exists():
        data = json.loads(report.read_text())
        assert code == 128 + signum and data["exit_code"] == code, (code, own)
        assert data["status"] == f"stopped by {name}" and data["not_collected"] == {}
        assert own == [f"mpvmm: stopped by {name}; exit code {code}"], own
    else:
        # Stopped while it loaded, quietly: nothing was created.
        quiet_exits = (128 + signum,) if signum == signal.SIGINT else (128 + signum, -signum)
        assert code in quiet_exits and own == [], (code, own)


def child_processes() -> set[int]:
    children = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    children.add(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    return children


def leak_state() -> tuple:
    return ipc_objects(), device_model_processes(), child_processes(), open_fds(), threading.active_count()


def soak(cycles: int, tmp_path, seed: int, kernel: str, first_faults: list[str] = ()) -> None:
    """``cycles`` cycles from ``seed``; the first ones take ``first_faults`` in order, so every kind is in."""
    rng = random.Random(seed)
    baseline = leak_state()
    for number in range(cycles):
        shape = random_shape(rng, kernel)
        fault = first_faults[number] if number < len(first_faults) else random_fault(rng, shape)
        if fault in ("killed-worker", "stopped-worker"):
            shape.runner, shape.kernel, shape.workload = "process", None, rng.choice(SOAK_WORKLOADS)
        if fault == "guest-stop" and shape.kernel:
            shape.kernel, shape.workload = None, rng.choice(SOAK_WORKLOADS)
        cycle = Cycle(number, shape, fault)
        folder = tmp_path / f"cycle{number}"
        folder.mkdir()
        try:
            started = time.monotonic()
            (run_cli if fault == CLI else run_in_process)(cycle, folder, rng)
            print(f"cycle {number}: {fault}, {shape.cpus} vCPUs {shape.runner} {shape.transport} {shape.workload}, "
                  f"clients {','.join(cycle.clients) or '-'}, {cycle.details}, {time.monotonic() - started:.1f} s")
            now = leak_state()
            assert now == baseline, ("leaked", now, baseline)
            assert sorted(os.listdir(folder)) in ([], ["console"], ["console", "report.json"]), os.listdir(folder)
        except Exception as err:
            raise AssertionError(f"soak cycle {cycle}: {err!r}") from err


ALL_FAULTS = [*FAULTS, CLI]


def test_soak_short(tmp_path, debian_kernel, no_leaks):
    """About a minute: every fault once, then random ones."""
    soak(int(os.environ.get("MPVMM_SOAK_CYCLES", "30")), tmp_path, seed=1, kernel=debian_kernel,
         first_faults=ALL_FAULTS)


@pytest.mark.slow
def test_soak_long(tmp_path, debian_kernel, no_leaks):
    soak(500, tmp_path, seed=2, kernel=debian_kernel, first_faults=ALL_FAULTS)
