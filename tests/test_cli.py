"""The mpvmm command as a user runs it: output, exit codes, signals, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import thread_names
from tests.startup import StderrLines, import_time_env

MPVMM = [sys.executable, "-m", "mpvmm"]


@pytest.fixture
def start(spawn):
    """``mpvmm start ARGS`` with pipes for its output, reaped at teardown whatever the test did.

    Tests serve /metrics on any free port: the default one may be taken by
    another run on the same host (another test suite, a person), and that is
    exit 2 before anything starts.
    """
    def popen(*args, **kwargs):
        return spawn([*MPVMM, "start", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    return popen


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


def test_main_job_eight_vcpus(start, no_leaks):
    """`mpvmm start --cpus 8 --seconds 3`: 8 online lines, the summary, exit 0,
    and while it runs one vcpuN thread per vCPU beside a device-model process."""
    process = start("--cpus", "8", "--seconds", "3", "--metrics-port", "0")
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


def test_report_matches_guest_counts(start, tmp_path, no_leaks):
    report = tmp_path / "report.json"
    process = start("--cpus", "2", "--metrics-port", "0", "--seconds", "1", "--workload", "pio-device", "--runner", "python",
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
def test_stop_signal_ends_cleanly_with_summary(signum, start, tmp_path, no_leaks):
    process = start("--cpus", "2", "--workload", "uart", "--metrics-port", "0", "--console", str(tmp_path / "console"))
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
    (["--memory", "64K"], "--memory 64 KiB is too small"),
    (["--memory", "4096"], "--memory 4 KiB is too small for the guest with 1 vCPU (needs at least "),
    (["--memory", "1000"], "multiple of 4096"),
    (["--memory", "100T"], "exceeds the host's available memory"),
    (["--workload", "nope"], "invalid choice"),
    (["--seconds", "-1"], "argument --seconds: must be a number of seconds from 0 to 31536000, not -1"),
    (["--seconds", "nan"], "argument --seconds: must be a number of seconds from 0 to 31536000, not nan"),
    (["--seconds", "inf"], "argument --seconds: must be a number of seconds from 0 to 31536000, not inf"),
    (["--seconds=-inf"], "argument --seconds: must be a number of seconds from 0 to 31536000, not -inf"),
    (["--seconds", "1e300"], "argument --seconds: must be a number of seconds from 0 to 31536000, not 1e+300"),
    (["--seconds", "soon"], "argument --seconds: invalid number of seconds 'soon'"),
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
def test_stop_signal_during_start_up_leaves_nothing(delay, start, tmp_path, no_leaks):
    """SIGTERM while the VM is still being built: a clean stop (or, before Python
    has even installed its handlers, a plain death with nothing created yet)."""
    process = start("--cpus", "4", "--workload", "pio-device", "--metrics-port", "0",
                    "--console", str(tmp_path / "console"))
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("runner", ["native", "process"])
def test_stop_signal_to_the_whole_process_group(signum, runner, start, tmp_path, no_leaks):
    """Ctrl-C reaches every process of the foreground group, `timeout` and service managers
    signal the whole group: only the supervisor acts, so it is a clean stop, not a dead device model."""
    process = start("--cpus", "2", "--runner", runner, "--workload", "pio-device", "--metrics-port", "0",
                    "--console", str(tmp_path / "console"), start_new_session=True)
    deadline = time.monotonic() + 10
    while not any("mpvmm.devicemodel" in c for c in children(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, "device model never started"
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signum)
    _out, stderr = process.communicate(timeout=30)
    assert process.returncode == 128 + signum, stderr
    assert stderr.splitlines()[-1] == f"mpvmm: stopped by {signal.Signals(signum).name}; exit code {128 + signum}"
    assert "Traceback" not in stderr


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8])
def test_ctrl_c_at_any_moment_of_start_up_is_quiet(delay, spawn, tmp_path):
    """Ctrl-C (SIGINT to the whole group) from the first line of mpvmm's own code on: exit 130,
    no traceback from the supervisor or the device model, whether the supervisor is still
    importing, building the VM, or the device model's interpreter is starting."""
    process = spawn([*MPVMM, "start", "--cpus", "2", "--workload", "pio-device", "--metrics-port", "0",
                     "--console", str(tmp_path / "console")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    text=True, start_new_session=True, env=import_time_env())
    stderr = StderrLines(process)
    stderr.wait_for_mpvmm_code(30)
    time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=60)
    own = stderr.own(timeout=60)
    assert code == 130, own
    assert own in ([], ["mpvmm: stopped by SIGINT; exit code 130"]), own


@pytest.mark.parametrize("option, value", [
    ("--downtime-ms", "nan"), ("--downtime-ms", "0"), ("--downtime-ms", "inf"), ("--timeout", "nan"),
    ("--timeout", "inf"), ("--timeout", "1e300"), ("--max-bandwidth", "nan"), ("--max-bandwidth", "-1"),
    ("--max-bandwidth", "inf"),
])
def test_ctl_migrate_numbers_are_checked_before_connecting(option, value, tmp_path):
    """No socket exists: a value that got through would fail to connect (exit 1), or overflow a timeout."""
    process = subprocess.run([*MPVMM, "ctl", "--api-socket", str(tmp_path / "none.sock"), "migrate",
                              "tcp:127.0.0.1:1", f"{option}={value}"], capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and f"argument {option}: must be a number of " in lines[0], process.stderr
