"""End-to-end runs of the built-in guest on real KVM, checked against the guest's own counts."""

import os
import re
import signal
import time

import pytest

from mpvmm.devicemodel.machine import MMIO_TESTDEV_NAME, PIO_TESTDEV_NAME
from mpvmm.guest import abi
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.supervisor.summary import guest_exits
from mpvmm.vcpu_worker.outcome import Exited
from mpvmm.vcpu_worker.stats_page import PATHS
from tests.conftest import thread_names

SUM_MASK = (1 << 64) - 1
# The op each workload exists to do; it must have happened on every vCPU.
MAIN_OP = {
    "demo": "sleeps",
    "compute": "compute_iterations",
    "pio-null": "pio_null_writes",
    "pio-device": "pio_device_writes",
    "mmio": "mmio_writes",
    "uart": "uart_bytes",
    "atomics": "atomic_increments",
    "dirty": "dirty_pages",
}
CONSOLE_LINE = re.compile(r"^vcpu (\d+) (online|demo round \d+|uart line \d+)$")


def guest_paths(ops):
    """The exits the guest says it made, by the route each takes (abi.OP_PATHS)."""
    paths = dict.fromkeys(PATHS, 0)
    for op, path in abi.OP_PATHS.items():
        paths[path] += ops[op]
    return paths


def run(cpus, workload, runner, tmp_path, seconds=0.6, on_started=None):
    console = tmp_path / "console.txt"
    config = RunConfig(cpus=cpus, memory=64 << 20, workload=workload, seconds=seconds,
                       runner=runner, console=str(console))
    result = Supervisor(config, on_started=on_started).run()
    return result, console.read_text()


def total(result, op):
    return sum(v.guest.ops[op] for v in result.vcpus)


def check_counts_agree(result, cpus, workload):
    """Every exit the VMM saw is one the guest says it made, route by route."""
    assert result.exit_code == 0, result.status
    assert len(result.vcpus) == cpus
    for vcpu in result.vcpus:
        ops = vcpu.guest.ops
        assert vcpu.outcome == Exited(0)
        assert vcpu.guest.state == abi.REPORT_STATE_DONE
        assert ops[MAIN_OP[workload]] > 0
        assert ops["read_mismatches"] == 0
        assert set(vcpu.exits) <= {"io", "mmio", "intr"}
        assert vcpu.exits.get("io", 0) + vcpu.exits.get("mmio", 0) == guest_exits(ops)
        assert vcpu.exits.get("mmio", 0) == ops["mmio_writes"] + ops["mmio_reads"]
        assert vcpu.paths == guest_paths(ops)
        assert sum(vcpu.sync_latency_buckets) == vcpu.paths["sync"]

    devices = result.device_model["devices"]
    requests = result.device_model["requests"]
    assert devices[PIO_TESTDEV_NAME]["writes"] == total(result, "pio_device_writes")
    assert devices[PIO_TESTDEV_NAME]["reads"] == total(result, "pio_device_reads")
    assert devices[PIO_TESTDEV_NAME]["write_sum"] == sum(v.guest.pio_write_sum for v in result.vcpus) & SUM_MASK
    assert devices[MMIO_TESTDEV_NAME]["writes"] == total(result, "mmio_writes")
    assert devices[MMIO_TESTDEV_NAME]["reads"] == total(result, "mmio_reads")
    assert devices[MMIO_TESTDEV_NAME]["write_sum"] == sum(v.guest.mmio_write_sum for v in result.vcpus) & SUM_MASK
    assert devices["com1"]["out_bytes"] == total(result, "uart_bytes")
    assert requests["com1"]["read"] == total(result, "uart_syncs")
    assert all(count == 0 for ops in result.device_model["unmapped"].values() for count in ops.values())
    assert all(count == 0 for count in result.device_model["rejected"].values())
    assert result.atomic_total == total(result, "atomic_increments")


def check_console(console, cpus, uart_bytes):
    """Whole lines only, one online line per vCPU, every byte the guest sent."""
    assert len(console) == uart_bytes
    lines = console.splitlines()
    assert all(CONSOLE_LINE.match(line) for line in lines), [l for l in lines if not CONSOLE_LINE.match(l)][:3]
    online = sorted(int(CONSOLE_LINE.match(l).group(1)) for l in lines if l.endswith("online"))
    assert online == list(range(cpus))


@pytest.mark.parametrize("runner", ["native", "python", "process"])
@pytest.mark.parametrize("cpus", [1, 2, 4, 8])
# The virtio-blk workloads need a disk: tests/virtio_device/ runs them against their files.
@pytest.mark.parametrize("workload", [w for w in abi.WORKLOADS
                                      if w not in abi.MISBEHAVING_WORKLOADS + abi.VIRTIO_BLK_WORKLOADS])
def test_counts_agree(workload, cpus, runner, tmp_path, no_leaks):
    result, console = run(cpus, workload, runner, tmp_path)
    check_counts_agree(result, cpus, workload)
    check_console(console, cpus, total(result, "uart_bytes"))


@pytest.mark.parametrize("runner", ["native", "python", "process"])
def test_atomics_total_is_exact_under_contention(runner, tmp_path, no_leaks):
    result, _ = run(8, "atomics", runner, tmp_path, seconds=1.0)
    assert result.atomic_total == total(result, "atomic_increments") > 8 * 1000


@pytest.mark.parametrize("runner", ["native", "python"])
def test_vcpu_threads_are_named_and_device_model_runs(runner, tmp_path, no_leaks):
    seen = {}

    def look(vm):
        time.sleep(0.3)
        seen["threads"] = thread_names()
        with open(f"/proc/{vm.device_model.pid}/cmdline", "rb") as f:
            seen["device_model"] = f.read().split(b"\0")
        seen["tids"] = {runner.index: runner.stats.tid for runner in vm.vcpus}

    result, _ = run(4, "pio-null", runner, tmp_path, seconds=1.0, on_started=look)
    assert result.exit_code == 0
    assert sorted(n for n in seen["threads"] if n.startswith("vcpu")) == [f"vcpu{i}" for i in range(4)]
    assert b"mpvmm.devicemodel" in seen["device_model"]
    assert all(tid > 0 and tid != os.getpid() for tid in seen["tids"].values())


@pytest.mark.parametrize("runner", ["native", "python", "process"])
def test_pause_freezes_and_resume_continues(runner, tmp_path, no_leaks):
    observed = {}

    def pause_and_resume(vm):
        time.sleep(0.3)
        vm.vcpus.pause()
        assert vm.vcpus.wait_paused(3), "vCPUs did not pause"
        frozen = [runner.stats.runs for runner in vm.vcpus]
        time.sleep(0.3)
        observed["while_paused"] = [runner.stats.runs for runner in vm.vcpus] == frozen and vm.vcpus.paused()
        vm.vcpus.resume()
        time.sleep(0.3)
        observed["resumed"] = (all(runner.stats.runs > before for runner, before in zip(vm.vcpus, frozen))
                               and not any(runner.paused for runner in vm.vcpus))

    result, _ = run(2, "pio-null", runner, tmp_path, seconds=1.5, on_started=pause_and_resume)
    assert observed == {"while_paused": True, "resumed": True}
    check_counts_agree(result, 2, "pio-null")


def test_process_runner_runs_one_process_per_vcpu(tmp_path, no_leaks):
    seen = {}

    def look(vm):
        time.sleep(0.3)
        seen["pids"] = [runner.pid for runner in vm.vcpus]
        seen["names"] = []
        for pid in seen["pids"]:
            with open(f"/proc/{pid}/comm") as f:
                seen["names"].append(f.read().strip())

    result, _ = run(4, "pio-null", "process", tmp_path, seconds=1.0, on_started=look)
    check_counts_agree(result, 4, "pio-null")
    assert len(set(seen["pids"])) == 4 and os.getpid() not in seen["pids"]
    assert seen["names"] == [f"vcpu{i}" for i in range(4)]
    assert [v.pid for v in result.vcpus] == seen["pids"]
    assert all(v.cpu_seconds is not None and v.cpu_seconds > 0 for v in result.vcpus)


def test_killed_worker_process_ends_the_vm(tmp_path, no_leaks):
    def kill_one(vm):
        time.sleep(0.3)
        os.kill(vm.vcpus[1].pid, signal.SIGKILL)

    result, _ = run(2, "pio-null", "process", tmp_path, seconds=10, on_started=kill_one)
    assert result.exit_code == 1
    assert "vcpu 1" in result.status and "SIGKILL" in result.status
    assert result.seconds < 5
