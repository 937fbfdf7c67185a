"""The mpvmm command as a user runs it: output, exit codes, signals, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import thread_names

MPVMM = [sys.executable, "-m", "mpvmm"]


def start(*args, **kwargs):
    return subprocess.Popen([*MPVMM, "start", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        found.append(f.read().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return found


def test_main_job_eight_vcpus(no_leaks):
    """`mpvmm start --cpus 8 --seconds 3`: 8 online lines, the summary, exit 0,
    and while it runs one vcpuN thread per vCPU beside a device-model process."""
    process = start("--cpus", "8", "--seconds", "3")
    expected = {f"vcpu{i}" for i in range(8)}
    deadline = time.monotonic() + 10
    while not expected <= set(thread_names(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, "vcpu threads never appeared"
        time.sleep(0.05)
    assert any("mpvmm.devicemodel" in c for c in children(process.pid))
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    for index in range(8):
        assert f"vcpu {index} online" in stdout.splitlines()
    assert "8 vCPUs, native runner, demo workload" in stdout
    assert "time limit reached; exit code 0" in stderr
    assert "Traceback" not in stderr


def test_report_matches_guest_counts(tmp_path, no_leaks):
    report = tmp_path / "report.json"
    process = start("--cpus", "2", "--seconds", "1", "--workload", "pio-device", "--runner", "python",
                    "--report", str(report), "--console", str(tmp_path / "console"))
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    data = json.loads(report.read_text())
    assert data["config"]["runner"] == "python" and data["exit_code"] == 0
    testdev = data["device_model"]["devices"]["testdev-pio"]
    assert testdev["writes"] == sum(v["guest"]["ops"]["pio_device_writes"] for v in data["vcpus"]) > 0
    # The writes went through KVM's coalesced ring, or exited when it was full.
    fallbacks = sum(vcpu["paths"]["fallback"] for vcpu in data["vcpus"])
    assert data["device_model"]["coalesced"]["testdev-pio"] + fallbacks == testdev["writes"]
    for vcpu in data["vcpus"]:
        assert vcpu["paths"]["posted"] == vcpu["guest"]["ops"]["uart_bytes"]
        assert vcpu["exits"]["io"] == sum(vcpu["paths"].values())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_ends_cleanly_with_summary(signum, tmp_path, no_leaks):
    process = start("--cpus", "2", "--workload", "uart", "--console", str(tmp_path / "console"))
    deadline = time.monotonic() + 10
    while not {"vcpu0", "vcpu1"} <= set(thread_names(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=30)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {name}" in stderr
    assert "2 vCPUs, native runner, uart workload" in stdout
    assert "Traceback" not in stderr


BAD_INPUT = [
    (["--cpus", "0"], "--cpus must be at least 1"),
    (["--cpus", "100000"], "more than KVM allows"),
    (["--cpus", "two"], "invalid int value"),
    (["--memory", "banana"], "invalid size"),
    (["--memory", "64K"], "too small"),
    (["--memory", "1000"], "multiple of 4096"),
    (["--memory", "100T"], "exceeds the host's available memory"),
    (["--workload", "nope"], "invalid choice"),
    (["--seconds", "-1"], "--seconds must not be negative"),
    (["--runner", "fast"], "invalid choice"),
    (["--transport", "pigeon"], "invalid choice"),
    (["--kernel", "/nonexistent/bzImage"], "kernel /nonexistent/bzImage: No such file"),
    (["--kernel", "/nonexistent/bzImage", "--runner", "process"], "--runner process has no shared interrupt controller"),
    (["--report", "/nonexistent/dir/report.json"], "--report"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(args, message, no_leaks):
    process = subprocess.run([*MPVMM, "start", *args], capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], process.stderr
    assert lines[0].startswith("mpvmm")


def test_no_command_is_usage_error():
    process = subprocess.run(MPVMM, capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    assert len(process.stderr.splitlines()) == 1


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.5, 0.8, 1.2])
def test_stop_signal_during_start_up_leaves_nothing(delay, tmp_path, no_leaks):
    """SIGTERM while the VM is still being built: a clean stop (or, before Python
    has even installed its handlers, a plain death with nothing created yet)."""
    process = start("--cpus", "4", "--workload", "pio-device", "--metrics-port", "0",
                    "--console", str(tmp_path / "console"))
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), stderr
    assert "Traceback" not in stderr
