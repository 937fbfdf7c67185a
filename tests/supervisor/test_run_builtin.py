"""End-to-end runs of the built-in guest on real KVM, checked against the guest's own counts."""

import os
import re
import signal
import time

import pytest

from mpvmm.devicemodel.machine import MMIO_TESTDEV_NAME, PIO_TESTDEV_NAME
from mpvmm.guest import abi
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.transport import TRANSPORTS
from mpvmm.vcpu_worker.outcome import Exited
from mpvmm.vcpu_worker.stats_page import PATHS

FALLBACK = PATHS.index("fallback")
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
    "doorbell": "pio_doorbells",
    "writes": "mmio_writes",
}
CONSOLE_LINE = re.compile(r"^vcpu (\d+) (online|demo round \d+|uart line \d+)$")


def guest_paths(ops, coalesced):
    """The exits the guest says it made, by the route each takes (abi.OP_PATHS).

    Doorbells make no exit: every runner has KVM signal their eventfds. With
    ``coalesced`` (a VM with a coalesced ring) register writes make none
    either, but for the fallbacks, which are counted apart.
    """
    in_kernel = abi.DOORBELL_OPS + (abi.COALESCIBLE_OPS if coalesced else ())
    paths = dict.fromkeys(PATHS, 0)
    for op, path in abi.OP_PATHS.items():
        if op not in in_kernel:
            paths[path] += ops[op]
    return paths


def run(cpus, workload, runner, tmp_path, seconds=0.6, on_started=None, transport="ring"):
    console = tmp_path / "console.txt"
    config = RunConfig(cpus=cpus, memory=64 << 20, workload=workload, seconds=seconds,
                       runner=runner, transport=transport, console=str(console))
    result = Supervisor(config, on_started=on_started).run()
    return result, console.read_text()


def total(result, op):
    return sum(v.guest.ops[op] for v in result.vcpus)


def coalescing(result):
    """Whether this run's VM had a coalesced ring (not the process runner's: vcpu_host.py)."""
    return result.device_model["process"]["coalesced_ring"] is not None


def check_counts_agree(result, cpus, workload):
    """Every exit the VMM saw is one the guest says it made, route by route; every access reached its device."""
    assert result.exit_code == 0, result.status
    assert len(result.vcpus) == cpus
    coalesced = coalescing(result)
    for vcpu in result.vcpus:
        ops = vcpu.guest.ops
        assert vcpu.outcome == Exited(0)
        assert vcpu.guest.state == abi.REPORT_STATE_DONE
        assert ops[MAIN_OP[workload]] > 0
        assert ops["read_mismatches"] == 0
        assert set(vcpu.exits) <= {"io", "mmio", "intr"}
        fallbacks = vcpu.paths["fallback"]
        assert vcpu.paths == {**guest_paths(ops, coalesced), "fallback": fallbacks}
        assert fallbacks <= sum(ops[op] for op in abi.COALESCIBLE_OPS) if coalesced else fallbacks == 0
        assert vcpu.exits.get("io", 0) + vcpu.exits.get("mmio", 0) == sum(vcpu.paths.values())
        mmio_exits = ops["mmio_reads"] + ops["mmio_doorbell_misses"] + (0 if coalesced else ops["mmio_writes"])
        assert mmio_exits <= vcpu.exits.get("mmio", 0) <= mmio_exits + fallbacks
        assert sum(vcpu.sync_latency_buckets) == vcpu.paths["sync"]

    model = result.device_model
    devices, requests = model["devices"], model["requests"]
    pio, mmio = devices[PIO_TESTDEV_NAME], devices[MMIO_TESTDEV_NAME]
    assert pio["writes"] == total(result, "pio_device_writes")
    assert pio["reads"] == total(result, "pio_device_reads")
    assert pio["write_sum"] == sum(v.guest.pio_write_sum for v in result.vcpus) & SUM_MASK
    assert mmio["writes"] == total(result, "mmio_writes")
    assert mmio["reads"] == total(result, "mmio_reads")
    assert mmio["write_sum"] == sum(v.guest.mmio_write_sum for v in result.vcpus) & SUM_MASK
    assert pio["order_errors"] == mmio["order_errors"] == 0  # each vCPU's writes arrived in its order
    # Every register write came through KVM's ring or an exit, and every doorbell rang through KVM.
    in_ring = model["coalesced"][PIO_TESTDEV_NAME] + model["coalesced"][MMIO_TESTDEV_NAME]
    writes = total(result, "pio_device_writes") + total(result, "mmio_writes")
    exited = sum(v.paths["fallback"] for v in result.vcpus) if coalesced else writes
    assert in_ring + exited == writes
    assert in_ring > 0 if coalesced and writes else in_ring == 0
    assert pio["doorbells"] == model["doorbells"][PIO_TESTDEV_NAME] == total(result, "pio_doorbells")
    assert mmio["doorbells"] == model["doorbells"][MMIO_TESTDEV_NAME] == total(result, "mmio_doorbells")
    assert mmio["doorbell_misses"] == total(result, "mmio_doorbell_misses")
    assert devices["com1"]["out_bytes"] == total(result, "uart_bytes")
    assert requests["com1"]["read"] == total(result, "uart_syncs")
    assert all(count == 0 for ops in model["unmapped"].values() for count in ops.values())
    assert all(count == 0 for count in model["rejected"].values())
    assert result.atomic_total == total(result, "atomic_increments")


def check_console(console, cpus, uart_bytes):
    """Whole lines only, one online line per vCPU, every byte the guest sent."""
    assert len(console) == uart_bytes
    lines = console.splitlines()
    assert all(CONSOLE_LINE.match(line) for line in lines), [l for l in lines if not CONSOLE_LINE.match(l)][:3]
    online = sorted(int(CONSOLE_LINE.match(l).group(1)) for l in lines if l.endswith("online"))
    assert online == list(range(cpus))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("runner", ["native", "python", "process"])
@pytest.mark.parametrize("cpus", [1, 2, 4, 8])
@pytest.mark.parametrize("workload", [w for w in abi.WORKLOADS if w not in abi.MISBEHAVING_WORKLOADS])
def test_counts_agree(workload, cpus, runner, transport, tmp_path, no_leaks):
    result, console = run(cpus, workload, runner, tmp_path, transport=transport)
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


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("runner", ["native", "python"])
@pytest.mark.parametrize("cpus", [1, 2])
def test_a_full_coalesced_ring_keeps_each_vcpus_order_and_every_write(cpus, runner, transport, tmp_path,
                                                                       no_leaks):
    """The device model stopped: KVM's ring fills, writes fall back to exits, and none overtakes the ring."""
    seen = {}

    def stall_device_model(vm):
        time.sleep(0.2)
        before = [runner.stats.paths[FALLBACK] for runner in vm.vcpus]
        os.kill(vm.device_model.pid, signal.SIGSTOP)
        try:
            # Each vCPU fills the ring, falls back once more and waits for that to be acknowledged.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                    runner.stats.paths[FALLBACK] == start for runner, start in zip(vm.vcpus, before)):
                time.sleep(0.01)
            blocked = [(runner.stats.runs, runner.stats.paths[FALLBACK]) for runner in vm.vcpus]
            time.sleep(0.2)
            seen["still"] = [(runner.stats.runs, runner.stats.paths[FALLBACK]) for runner in vm.vcpus] == blocked
            seen["new fallbacks"] = [after - start for (_, after), start in zip(blocked, before)]
        finally:
            os.kill(vm.device_model.pid, signal.SIGCONT)

    result, _ = run(cpus, "writes", runner, tmp_path, seconds=1.0, on_started=stall_device_model,
                    transport=transport)
    # One fallback each (a vCPU already waiting for one when the device model stopped adds none),
    # then nothing: every vCPU waits, none of its writes lost or reordered.
    assert seen["still"] and all(count in (0, 1) for count in seen["new fallbacks"]) and any(seen["new fallbacks"])
    check_counts_agree(result, cpus, "writes")  # the sums, and order_errors == 0 on both devices
    ring = result.device_model["process"]["coalesced_ring"]
    assert ring["peak"] == ring["capacity"]  # it was full


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
