"""The raw reference loop on real KVM: the guest runs correctly and every exit is counted.

The bench divides every runner's figures by raw's, so raw must make exactly
the exits the guest says it made, answer the guest's reads correctly (a wrong
answer shows as a read mismatch and a non-zero exit status) and stop when
forced. The native and python runners are checked the same way by
tests/supervisor/test_run_builtin.py.
"""

import ctypes
import time

import pytest

from mpvmm.bench import _rawloop, raw
from mpvmm.bench.raw import RawControl, RawRun
from mpvmm.guest import abi
from mpvmm.supervisor.summary import guest_exits
from mpvmm.vcpu_worker.outcome import Stopped

WORKLOADS = ("pio-null", "pio-device", "mmio", "uart", "compute", "atomics", "demo")
MAIN_OP = {
    "pio-null": "pio_null_writes",
    "pio-device": "pio_device_reads",
    "mmio": "mmio_reads",
    "uart": "uart_syncs",
    "compute": "compute_iterations",
    "atomics": "atomic_increments",
    "demo": "mmio_reads",
}
RUN_AFTER_ONLINE_SECONDS = 0.25


def test_control_block_matches_the_c():
    c = _rawloop.layout()
    assert ctypes.sizeof(RawControl) == c["raw_control.sizeof"]
    for name in ("stop", "tid", "exits"):
        assert getattr(RawControl, name).offset == c[f"raw_control.{name}"]
    assert raw.CONTROL_STRIDE == c["CONTROL_STRIDE"] >= ctypes.sizeof(RawControl)


def run_until_stopped(cpus, workload, stop):
    """Runs ``workload`` until every vCPU is online and a little more, then calls ``stop(run)``."""
    def started(run):
        deadline = time.monotonic() + 10
        while not all(run.guest.counts(i).state >= abi.REPORT_STATE_ONLINE for i in range(cpus)):
            assert time.monotonic() < deadline, "vCPUs did not come online"
            time.sleep(0.01)
        time.sleep(RUN_AFTER_ONLINE_SECONDS)
        stop(run)

    started_at = time.monotonic()
    result = RawRun(cpus, workload, on_started=started).run()
    return result, time.monotonic() - started_at


@pytest.mark.parametrize("cpus", [1, 2, 4, 8])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_raw_exit_counts_equal_the_guests(workload, cpus, no_leaks):
    result, _ = run_until_stopped(cpus, workload, RawRun.request_stop)
    assert result.ok, result.status
    assert len(result.vcpus) == cpus
    for vcpu in result.vcpus:
        ops = vcpu.guest.ops
        assert vcpu.guest.state == abi.REPORT_STATE_DONE
        assert ops[MAIN_OP[workload]] > 0
        assert ops["read_mismatches"] == 0  # every test-device and LSR read got the right answer
        assert vcpu.io_exits + vcpu.mmio_exits == guest_exits(ops)
        assert vcpu.mmio_exits == sum(ops[op] for op in abi.MMIO_OPS)
    assert result.atomic_total == sum(v.guest.ops["atomic_increments"] for v in result.vcpus)


def test_forced_stop_ends_a_guest_that_never_exits(no_leaks):
    """compute makes no exits: only immediate_exit and the kick get KVM_RUN back."""
    def force(run):
        for vcpu in run.vcpus:
            vcpu.stop()

    result, seconds = run_until_stopped(2, "compute", force)
    assert [v.outcome for v in result.vcpus] == [Stopped(), Stopped()]
    assert not result.ok
    assert seconds < 5


LIVE_COUNTER_BOUND_SECONDS = 10


def test_live_exit_counter_and_thread_ids(no_leaks):
    seen = {}

    def look(run):
        seen["tids"] = run.tids()
        # Counted while running: each vCPU's count rises between two reads. Under
        # load a vCPU thread may wait for a CPU, so the reads go on (bounded)
        # until every count has moved; a dead counter still fails.
        deadline = time.monotonic() + LIVE_COUNTER_BOUND_SECONDS
        seen["first"] = run.exits()
        while True:
            time.sleep(0.1)
            seen["second"] = run.exits()
            if all(b > a for a, b in zip(seen["first"], seen["second"])) or time.monotonic() > deadline:
                break
        run.request_stop()

    result, _ = run_until_stopped(2, "pio-null", look)
    assert all(tid > 0 for tid in seen["tids"]) and len(set(seen["tids"])) == 2
    assert all(b > a >= 0 for a, b in zip(seen["first"], seen["second"])), seen
    assert [v.io_exits for v in result.vcpus] >= seen["second"]
