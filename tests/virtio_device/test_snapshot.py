"""A VM with a virtio disk snapshotted mid-I/O and restored in a new process: the guest goes on.

The built-in guest polls its used ring with requests in flight, so the
device's ring indexes are part of what must come back: a restored device
that started its rings at 0 would hand the guest stale entries, which it
checks (word by word against the disk, and by its own request counts).
"""

from mpvmm.guest import abi
from mpvmm.snapshot import directory, records
from tests.snapshot.test_restore import take_snapshot
from tests.virtio_device.test_run import check_written_half, make_disk
from tests.vm_process import VmProcess, ctl, guest_ops


def test_a_vm_with_a_disk_carries_on_after_a_restore(tmp_path, no_leaks):
    disk = make_disk(tmp_path / "disk.img")
    snapshot, at_snapshot, _source = take_snapshot(tmp_path, "--workload", "virtio-blk-rw", "--disk", disk,
                                                   "--queue-depth", "8", "--memory", "64M")
    reads_before = guest_ops(at_snapshot, "blk_reads")[0]
    assert reads_before > 0
    machine = [payload for kind, payload in records.parse((snapshot / directory.STATE_FILE).read_bytes())
               if kind == records.MACHINE][0]
    assert machine["virtio"] == {"devices": [{"name": "disk0", "kind": "block", "path": disk, "read_only": False}],
                                 "block_queues": 1}

    restored = VmProcess(tmp_path, "restored", "--restore", str(snapshot), "--seconds", "1", api=False)
    assert restored.finish() == 0, restored.stderr
    report = restored.report()
    assert [v["outcome_value"] for v in report["vcpus"]] == [abi.STATUS_OK]
    ops = report["vcpus"][0]["guest"]["ops"]
    assert ops["blk_reads"] > reads_before and ops["blk_errors"] == 0 and ops["read_mismatches"] == 0
    device = report["virtio"]["disk0"]
    # The restored process served what the guest did after the snapshot (its counters start at 0).
    assert 0 < device["device"]["reads"] <= ops["blk_reads"] - reads_before + 8
    assert device["needs_reset_reason"] is None and device["transport"]["needs_reset"] == 0
    assert report["config"]["disks"] == [disk]
    check_written_half(disk, ops["blk_writes"])


def test_a_restore_whose_disk_changed_size_is_refused(tmp_path, no_leaks):
    disk = make_disk(tmp_path / "disk.img")
    snapshot, _status, _source = take_snapshot(tmp_path, "--workload", "virtio-blk-rw", "--disk", disk,
                                               "--memory", "64M")
    with open(disk, "ab") as f:
        f.write(bytes(4096))
    restored = VmProcess(tmp_path, "restored", "--restore", str(snapshot), "--seconds", "1", api=False)
    assert restored.finish() == 1
    assert "disk0" in restored.stderr and "sectors" in restored.stderr, restored.stderr


def test_migrating_a_vm_with_a_disk_is_refused_and_it_runs_on(tmp_path, no_leaks):
    source = VmProcess(tmp_path, "source", "--workload", "virtio-blk-rw", "--disk", make_disk(tmp_path / "disk.img"),
                       "--memory", "64M")
    try:
        source.wait_running()
        refused = ctl(source.api_path, "migrate", "tcp://127.0.0.1:9")
        assert refused.returncode != 0
        assert "cannot migrate a VM with virtio devices (disk0)" in refused.stderr, refused.stderr
        assert ctl(source.api_path, "stop").returncode == 0
        assert source.finish() == 0, source.stderr
    finally:
        source.kill()
