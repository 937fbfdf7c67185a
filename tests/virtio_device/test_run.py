"""virtio-blk devices in their own processes, driven by the built-in guest on real KVM.

The guest's counts (requests completed, kicks, register accesses) are checked
against the device processes' own counters, and the disk files against what
the guest wrote. Every VM here runs with the leak check: no device process,
shared memory or descriptor may be left behind, whatever ends the run.
"""

import os
import shutil
import signal
import sys
import threading

import pytest

from tests.test_cli import start  # noqa: F401 -- the fixture

from mpvmm.guest import abi
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.virtio_device.syscalls import ALLOWED_SYSCALLS

BLOCK = 4096
DISK_BLOCKS = 1024  # 4 MiB: the read half and the written half


def make_disk(path, blocks=DISK_BLOCKS):
    """The disk pattern in the first half, zeroes in the second (where the rw workload writes)."""
    half = blocks // 2 * BLOCK
    path.write_bytes(abi.disk_pattern(0, half) + bytes(blocks * BLOCK - half))
    return str(path)


def run(config, on_started=None):
    stats = {}
    result = Supervisor(config, on_started=on_started, on_stopped=lambda vm: stats.update(vm.virtio.stats())).run()
    return result, stats


def check_written_half(path, writes, blocks=DISK_BLOCKS):
    """The guest wrote the pattern into the second half, block after block from its start."""
    data = open(path, "rb").read()
    half = blocks // 2
    written = min(writes, blocks - half)
    start, end = half * BLOCK, (half + written) * BLOCK
    assert data[start:end] == abi.disk_pattern(start, end - start)
    assert data[end:] == bytes(len(data) - end)
    assert data[:start] == abi.disk_pattern(0, start)  # the read half untouched


def check_device_counts(ops, stats):
    """What the guest completed is what the device did; every kick stayed in the kernel."""
    device, queue, transport = stats["device"], stats["queues"][0], stats["transport"]
    assert device["reads"] == ops["blk_reads"] and device["writes"] == ops["blk_writes"]
    assert device["flushes"] == ops["blk_flushes"]
    assert device["io_errors"] == 0 and stats["needs_reset_reason"] is None
    assert queue["notifications"] == ops["virtio_kicks"] > 0
    assert transport["mmio_notifications"] == 0  # none came through the device model
    assert transport["register_reads"] == ops["virtio_reg_reads"]
    assert transport["register_writes"] == ops["virtio_reg_writes"]


@pytest.mark.parametrize("depth", [1, 8])
def test_reads_writes_and_flushes_reach_the_file(tmp_path, no_leaks, depth):
    disk = make_disk(tmp_path / "disk.img")
    result, stats = run(RunConfig(workload="virtio-blk-rw", disks=(disk,), seconds=1.0, queue_depth=depth))
    assert result.exit_code == 0, result.status
    ops = result.vcpus[0].guest.ops
    assert ops["blk_reads"] > 0 and ops["blk_writes"] > 0 and ops["blk_flushes"] > 0
    assert ops["blk_errors"] == 0 and ops["read_mismatches"] == 0
    check_device_counts(ops, stats["disk0"])
    check_written_half(disk, ops["blk_writes"])
    assert result.virtio["disk0"]["device"]["writes"] == ops["blk_writes"]  # the last counters, after the end


def test_two_disks_on_two_processes_in_parallel(tmp_path, no_leaks):
    disks = (make_disk(tmp_path / "a.img"), make_disk(tmp_path / "b.img"))
    pids = []
    result, stats = run(RunConfig(cpus=2, workload="virtio-blk-rw", disks=disks, seconds=1.0, queue_depth=4),
                        on_started=lambda vm: pids.extend(device.pid for device in vm.virtio.devices))
    assert result.exit_code == 0, result.status
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for index, disk in enumerate(disks):
        ops = result.vcpus[index].guest.ops  # vCPU i drives disk i
        assert ops["blk_reads"] > 0 and ops["blk_errors"] == 0 and ops["read_mismatches"] == 0
        check_device_counts(ops, stats[f"disk{index}"])
        check_written_half(disk, ops["blk_writes"])


def test_read_only_disk_is_only_read(tmp_path, no_leaks):
    disk = make_disk(tmp_path / "disk.img")
    before = open(disk, "rb").read()
    result, stats = run(RunConfig(workload="virtio-blk-rw", disks=(f"{disk},readonly",), seconds=0.5, queue_depth=4))
    assert result.exit_code == 0, result.status
    ops = result.vcpus[0].guest.ops
    assert ops["blk_reads"] > 0 and ops["blk_writes"] == 0 and ops["blk_errors"] == 0  # the guest saw RO
    assert stats["disk0"]["device"]["writes"] == 0
    assert open(disk, "rb").read() == before


def test_a_device_process_killed_mid_io_ends_the_vm_naming_it(tmp_path, no_leaks):
    disk = make_disk(tmp_path / "disk.img")
    killed = []

    def kill_soon(vm):
        device = vm.virtio.devices[0]

        def kill():
            killed.append(vm.vcpus[0] and vm.guest.counts(0).ops["blk_reads"])
            os.kill(device.pid, signal.SIGKILL)

        threading.Timer(0.5, kill).start()

    result, _ = run(RunConfig(workload="virtio-blk", disks=(disk,), seconds=30, queue_depth=4), on_started=kill_soon)
    assert killed and killed[0] > 0  # it was serving reads when it died
    assert result.exit_code == 1
    assert result.status == "virtio device disk0 died (killed by signal 9)"
    assert result.seconds < 10
    assert "disk0" in result.not_collected


def test_device_process_calls_only_allowed_syscalls(tmp_path, monkeypatch, no_leaks):
    """Each device process under strace: what it calls after loading its filter is on its allow-list.

    The recording the allow-list was made from: block reads, writes and
    flushes, and the console and entropy devices started, configured, asked
    for stats and shut down.
    """
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is not installed: run scripts/install.sh (Debian package strace)")
    traces = tmp_path / "traces"
    traces.mkdir()
    wrapper = tmp_path / "python"
    # -ff: a file per process, so the device model's and each device's tracers never share one.
    wrapper.write_text(f'#!/bin/sh\nexec {strace} -ff -qq -o {traces}/trace {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))
    disk = make_disk(tmp_path / "disk.img")
    result, _ = run(RunConfig(workload="virtio-blk-rw", disks=(disk,), seconds=1.0, queue_depth=4, rng=True,
                              console_device="virtio", console=str(tmp_path / "console.txt")))
    assert result.exit_code == 0, result.status
    calls = {}
    for trace in traces.iterdir():
        name, names = device_calls(trace.read_text().splitlines())
        if name is not None:
            calls[name] = names
    assert set(calls) == {"disk0", "console", "rng"}
    for name, names in calls.items():
        outside = names - set(ALLOWED_SYSCALLS)
        assert outside == set(), f"{name} called syscalls its filter denies: {outside}"
    assert {"preadv2", "pwritev2", "fdatasync", "epoll_wait", "read"} <= calls["disk0"]


def device_calls(lines):
    """(device name, syscall names it made after its seccomp filter was loaded) of one traced process.

    A device process is named by its command line (``-m mpvmm.virtio_device FD NAME``);
    (None, ...) for any other process.
    """
    name, loaded, calls = None, False, set()
    for line in lines:
        if line.startswith("execve(") and '"mpvmm.virtio_device"' in line:
            name = line.split('"mpvmm.virtio_device", ', 1)[1].split("]", 1)[0].split(", ")[1].strip('"')
        elif line.startswith(("seccomp(SECCOMP_SET_MODE_FILTER", "prctl(PR_SET_SECCOMP")) and line.endswith("= 0"):
            loaded = True
        elif loaded and "(" in line:
            calls.add(line.split("(", 1)[0])
    return name, calls


@pytest.mark.parametrize("args, message", [
    (["--disk", "/nonexistent/disk.img"], "--disk /nonexistent/disk.img: No such file or directory"),
    (["--disk", "{disk},bogus"], "expected PATH or PATH,readonly"),
    (["--workload", "virtio-blk"], "--workload virtio-blk needs a --disk"),
    (["--workload", "virtio-blk", "--disk", "{disk}", "--queue-depth", "65"], "--queue-depth must be between 1 and 64"),
    (["--disk", "{disk}", "--runner", "process"], "virtio devices need one VM"),
])
def test_bad_virtio_options_are_one_line_and_exit_2(tmp_path, start, args, message):
    disk = make_disk(tmp_path / "disk.img")
    process = start(*[arg.format(disk=disk) for arg in args], "--seconds", "1", "--no-metrics")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert out == ""
