"""Snapshot a running VM and carry it on in a new process, with real processes and the real CLI."""

import os
import time

import pytest

from mpvmm.guest import abi
from mpvmm.snapshot import directory, records
from tests.conftest import ipc_objects
from tests.vm_process import VmProcess, ctl, guest_ops


def take_snapshot(tmp_path, *args):
    """A VM started with ``args``, paused and saved mid-run to tmp_path/snap, then stopped.

    Returns the directory, the VM's status at the snapshot and its process.
    """
    source = VmProcess(tmp_path, "source", *args)
    try:
        source.wait_running()
        time.sleep(0.5)
        assert ctl(source.api_path, "pause").returncode == 0
        status = source.api("GET", "/v1/vm")[1]
        saved = ctl(source.api_path, "snapshot", str(tmp_path / "snap"))
        assert saved.returncode == 0, saved.stderr
        assert ctl(source.api_path, "stop").returncode == 0
        assert source.finish() == 0, source.stderr
    finally:
        source.kill()
    return tmp_path / "snap", status, source


def snapshot_atomics(tmp_path, cpus=4, runner="native"):
    """A VM running atomics, snapshotted mid-run; (snapshot dir, its status at the snapshot)."""
    snapshot, status, _source = take_snapshot(tmp_path, "--cpus", str(cpus), "--workload", "atomics",
                                              "--runner", runner)
    return snapshot, status


@pytest.mark.parametrize("runner", ["native", "python"])
def test_atomics_carry_on_in_a_new_process(runner, tmp_path, no_leaks):
    snapshot, at_snapshot = snapshot_atomics(tmp_path, runner=runner)
    counts = guest_ops(at_snapshot, "atomic_increments")
    assert all(count > 0 for count in counts)

    restored = VmProcess(tmp_path, "restored", "--restore", str(snapshot), "--seconds", "1", "--runner", runner,
                         api=False)
    assert restored.finish() == 0, restored.stderr
    report = restored.report()
    final = guest_ops(report, "atomic_increments")
    # Every vCPU's own count goes on from where it was, and the shared total is exact.
    assert all(after > before for after, before in zip(final, counts)), (counts, final)
    assert report["atomic_total"] == sum(final)
    assert [v["outcome"] for v in report["vcpus"]] == ["exited"] * 4
    assert [v["outcome_value"] for v in report["vcpus"]] == [abi.STATUS_OK] * 4  # registers agree with RAM
    assert report["config"]["cpus"] == 4 and report["config"]["workload"] == "atomics"
    assert "time limit reached" in restored.stderr


def test_a_snapshot_restores_twice(tmp_path, no_leaks):
    snapshot, at_snapshot = snapshot_atomics(tmp_path, cpus=2)
    totals = []
    for name in ("first", "second"):
        run = VmProcess(tmp_path, name, "--restore", str(snapshot), "--seconds", "0.3", api=False)
        assert run.finish() == 0, run.stderr
        totals.append(run.report()["atomic_total"])
    assert all(total > at_snapshot["atomic_total"] for total in totals)


def rewrite_state(snapshot, change):
    """Rewrite the state file's records through ``change(items)``, every checksum still right."""
    path = snapshot / directory.STATE_FILE
    items = change(records.parse(path.read_bytes()))
    path.write_bytes(b"".join(records.pack(kind, payload) for kind, payload in items))


def another_version(items):
    items[0][1]["version"] = directory.VERSION + 1
    return items


def flip_a_byte(snapshot):
    path = snapshot / directory.STATE_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(snapshot):
    path = snapshot / directory.STATE_FILE
    path.write_bytes(path.read_bytes()[:-100])


def wrong_size(snapshot):
    os.truncate(snapshot / directory.MEMORY_FILE, (64 << 20) + 4096)


def corrupt_memory(snapshot):
    with open(snapshot / directory.MEMORY_FILE, "r+b") as f:
        f.seek(0x100000)  # the guest's code
        f.write(b"\xcc")


def no_end_record(snapshot):
    rewrite_state(snapshot, lambda items: items[:-1])


def a_device_of_another_machine(snapshot):
    def change(items):
        items[-1][1]["records"] += 1
        return items[:-1] + [(records.DEVICE, {"name": "rtc", "state": {}})] + items[-1:]
    rewrite_state(snapshot, change)


def a_vcpu_too_few(snapshot):
    def change(items):
        items[-1][1]["records"] -= 1
        return [item for item in items if not (item[0] == records.VCPU and item[1]["index"] == 1)]
    rewrite_state(snapshot, change)


@pytest.mark.parametrize("damage, message", [
    (lambda snapshot: rewrite_state(snapshot, another_version), "format version 2"),
    (flip_a_byte, "checksum"),
    (truncate, "truncated"),
    (wrong_size, "is 67112960 bytes; the machine has 67108864"),
    (corrupt_memory, "does not hold the RAM that was saved"),
    (no_end_record, "no end record"),
    (a_device_of_another_machine, "lacks: rtc"),
    (a_vcpu_too_few, "the machine has 2 vCPUs but the records are for [0]"),
    (lambda snapshot: (snapshot / directory.STATE_FILE).unlink(), "No such file"),
])
def test_a_damaged_snapshot_is_one_line_and_exit_2_before_anything_is_created(damage, message, tmp_path, no_leaks):
    take_snapshot(tmp_path, "--cpus", "2", "--memory", "64M", "--workload", "atomics")
    damage(tmp_path / "snap")
    before = ipc_objects()
    restored = VmProcess(tmp_path, "restored", "--restore", str(tmp_path / "snap"), api=False)
    assert restored.finish() == 2
    lines = restored.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpvmm: error: snapshot ") and message in lines[0], lines
    assert restored.stdout == ""
    assert ipc_objects() == before


@pytest.mark.parametrize("args, message", [
    (["--cpus", "2"], "--restore brings the VM's own machine; --cpus cannot be given with it"),
    (["--workload", "demo", "--memory", "1G"], "--memory, --workload cannot be given"),
    (["--runner", "process"], "--runner process has a VM per vCPU"),
    (["--incoming", "unix:/tmp/x"], "--restore and --incoming each bring a VM"),
])
def test_restore_refuses_options_that_would_change_the_machine(args, message, tmp_path, no_leaks):
    (tmp_path / "snap").mkdir()
    process = VmProcess(tmp_path, "restored", "--restore", str(tmp_path / "snap"), *args, api=False)
    assert process.finish() == 2
    assert message in process.stderr and len(process.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workload, device, ops", [
    ("pio-device", "testdev-pio", ("pio_device_writes", "pio_device_reads")),
    ("mmio", "testdev-mmio", ("mmio_writes", "mmio_reads")),
])
def test_device_workloads_carry_on_with_their_devices(workload, device, ops, tmp_path, no_leaks):
    """Reads pending at the pause complete before the state is read, and the devices' counts come back.

    The guest checks every value it reads: a read whose result KVM had not
    yet put in a register would show as a mismatch (exit status 3).
    """
    _snapshot, _status, source = take_snapshot(tmp_path, "--cpus", "2", "--memory", "64M", "--workload", workload)
    restored = VmProcess(tmp_path, "restored", "--restore", str(tmp_path / "snap"), "--seconds", "0.5", api=False)
    assert restored.finish() == 0, restored.stderr
    report = restored.report()
    assert [v["outcome_value"] for v in report["vcpus"]] == [abi.STATUS_OK] * 2
    assert sum(guest_ops(report, "read_mismatches")) == 0
    writes, reads = (sum(guest_ops(report, op)) for op in ops)
    counted = report["device_model"]["devices"][device]
    assert (counted["writes"], counted["reads"]) == (writes, reads)
    assert writes > sum(guest_ops(source.report(), ops[0]))


SUM_MASK = (1 << 64) - 1


def check_device_sums(report):
    """Every write and doorbell the guest counts reached its device, once: across the pause, the
    snapshot and the restore (or the move), through KVM's coalesced ring, an exit or an eventfd."""
    devices, vcpus = report["device_model"]["devices"], report["vcpus"]
    pio, mmio = devices["testdev-pio"], devices["testdev-mmio"]
    assert pio["write_sum"] == sum(v["guest"]["pio_write_sum"] for v in vcpus) & SUM_MASK
    assert mmio["write_sum"] == sum(v["guest"]["mmio_write_sum"] for v in vcpus) & SUM_MASK
    assert pio["writes"] == sum(guest_ops(report, "pio_device_writes"))
    assert mmio["writes"] == sum(guest_ops(report, "mmio_writes"))
    assert pio["doorbells"] == sum(guest_ops(report, "pio_doorbells"))
    assert mmio["doorbells"] == sum(guest_ops(report, "mmio_doorbells"))
    assert mmio["doorbell_misses"] == sum(guest_ops(report, "mmio_doorbell_misses"))
    assert pio["order_errors"] == mmio["order_errors"] == 0  # every vCPU's sequence went on in order
    assert [v["outcome_value"] for v in vcpus] == [abi.STATUS_OK] * len(vcpus)


def in_kernel_share(report, workload):
    """What KVM took for the devices in this run: coalesced writes (writes), doorbell rings (doorbell)."""
    return sum(report["device_model"]["coalesced" if workload == "writes" else "doorbells"].values())


@pytest.mark.parametrize("workload, op", [("writes", "mmio_writes"), ("doorbell", "pio_doorbells")])
def test_the_ring_transport_and_the_in_kernel_routes_carry_on_with_the_sums(workload, op, tmp_path, no_leaks):
    """Coalesced writes or doorbells on 2 vCPUs over the ring transport, saved mid-run and restored.

    The source's device model drains KVM's coalesced ring (and its doorbells
    and rings) before it saves the devices; the restored VM's supervisor
    registers the coalesced zones and doorbells on its new VM and makes new
    rings before its device model starts: the restored run uses them again.
    """
    _snapshot, _status, source = take_snapshot(tmp_path, "--cpus", "2", "--memory", "64M", "--workload", workload,
                                               "--transport", "ring")
    restored = VmProcess(tmp_path, "restored", "--restore", str(tmp_path / "snap"), "--seconds", "0.5",
                         "--transport", "ring", api=False)
    assert restored.finish() == 0, restored.stderr
    before, after = source.report(), restored.report()
    check_device_sums(before)
    check_device_sums(after)
    assert sum(guest_ops(after, op)) > sum(guest_ops(before, op)) > 0
    assert after["config"]["transport"] == "ring" and after["device_model"]["process"]["transport"] == "ring"
    assert in_kernel_share(after, workload) > 0
