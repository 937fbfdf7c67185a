"""What a run writes, and what happens when it cannot: the console, the summary, the report.

Output that cannot be written never stops the VM from ending as asked and
never ends in a traceback; it is counted, named on stderr, kept in the
report, and makes an otherwise clean run exit 1.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from mpvmm.supervisor.run import RunConfig, Supervisor
from tests.metrics.conftest import scrape_values, series

MPVMM = [sys.executable, "-m", "mpvmm"]
# A run short enough for the suite; uart writes console lines all the time.
RUN = ["--workload", "uart", "--seconds", "1", "--metrics-port", "0"]


def status_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert lines and "Traceback" not in stderr, stderr
    return lines[-1]


@pytest.mark.parametrize("console, reason", [
    ("/proc/nope/x", "No such file or directory"),
    ("{tmp}", "Is a directory"),
    ("{tmp}/missing/console.log", "No such file or directory"),
    ("{tmp}/report.json/console.log", "Not a directory"),
])
def test_unwritable_console_is_one_line_and_exit_2_before_anything_is_created(console, reason, tmp_path, no_leaks):
    (tmp_path / "report.json").write_text("{}")
    console = console.format(tmp=tmp_path)
    process = subprocess.run([*MPVMM, "start", "--console", console, *RUN], capture_output=True, text=True,
                             timeout=30)
    assert process.returncode == 2
    assert process.stdout == ""
    # The usage check's line, not the device model's failure after the VM was built.
    assert process.stderr == f"mpvmm: error: --console {console}: {reason}\n"


BAD_USAGE = [
    ["--cpus", "0"], ["--memory", "64K"], ["--seconds", "nan"], ["--console", "/proc/nope/x"],
    ["--kernel", "/nonexistent/bzImage"], ["--metrics-port", "70000"], ["--workload", "nope"],
]


@pytest.mark.parametrize("args", BAD_USAGE, ids=" ".join)
def test_bad_usage_leaves_no_report_file(args, tmp_path, no_leaks):
    report = tmp_path / "r.json"
    process = subprocess.run([*MPVMM, "start", "--report", str(report), *args], capture_output=True, text=True,
                             timeout=30)
    assert process.returncode == 2, process.stderr
    assert len(process.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("report, reason", [
    ("{tmp}/missing/r.json", "No such file or directory"),
    ("{tmp}/file/r.json", "Not a directory"),
    ("{tmp}", "Is a directory"),
    ("/proc/r.json", "No such file or directory"),  # a folder that takes no new file, even from root
])
def test_unwritable_report_is_exit_2_and_creates_nothing(report, reason, tmp_path, no_leaks):
    (tmp_path / "file").write_text("")
    report = report.format(tmp=tmp_path)
    process = subprocess.run([*MPVMM, "start", "--report", report, *RUN], capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    assert process.stderr == f"mpvmm: error: --report {report}: {reason}\n"
    assert os.listdir(tmp_path) == ["file"]


def test_report_is_written_whole_at_the_end(spawn, tmp_path, no_leaks):
    """Never created early, never seen half-written: the old file until the end, then the new one."""
    report = tmp_path / "r.json"
    report.write_text("old\n")
    old_inode = report.stat().st_ino
    process = spawn([*MPVMM, "start", "--report", str(report), "--console", str(tmp_path / "console"),
                     "--workload", "uart", "--seconds", "2", "--metrics-port", "0"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    contents, names = set(), set()
    while process.poll() is None:
        contents.add(report.read_text())
        names.update(os.listdir(tmp_path))
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    final = report.read_text()
    assert contents <= {"old\n", final}, contents  # the old report, or (once renamed) the whole new one
    # Seen for a moment: the checks' probe files (created and removed at once) and the report's temporary file.
    assert all(name.startswith((".mpvmm-probe-", ".r.json.")) for name in names - {"r.json", "console"}), names
    assert sorted(os.listdir(tmp_path)) == ["console", "r.json"]
    data = json.loads(final)
    assert data["exit_code"] == 0 and data["not_collected"] == {} and data["output_errors"] == []
    assert report.stat().st_ino != old_inode  # replaced by a rename, not rewritten in place


def test_report_through_a_link_replaces_the_target_and_keeps_the_link(tmp_path, no_leaks):
    target = tmp_path / "reports" / "latest.json"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    process = subprocess.run([*MPVMM, "start", "--report", str(link), "--console", str(tmp_path / "console"), *RUN],
                             capture_output=True, text=True, timeout=30)
    assert process.returncode == 0, process.stderr
    assert link.is_symlink() and json.loads(target.read_text())["exit_code"] == 0


def test_report_to_stdout_follows_the_summary(tmp_path, no_leaks):
    """`--report /dev/stdout`, a pipe or a file the shell redirected: appended, never renamed over."""
    redirected = tmp_path / "out.txt"
    with open(redirected, "w") as stdout:
        process = subprocess.run([*MPVMM, "start", "--report", "/dev/stdout", "--console", str(tmp_path / "console"),
                                  *RUN], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=30)
    assert process.returncode == 0, process.stderr
    summary, _, report = redirected.read_text().partition("\n{\n")
    assert "1 vCPUs, native runner, uart workload" in summary
    assert json.loads("{\n" + report)["exit_code"] == 0


def test_console_on_a_full_device_is_counted_and_exits_1(tmp_path, no_leaks):
    """--console /dev/full: every byte the guest wrote is lost and counted; the run still ends as asked."""
    report = tmp_path / "r.json"
    process = subprocess.run([*MPVMM, "start", "--console", "/dev/full", "--report", str(report), *RUN],
                             capture_output=True, text=True, timeout=30)
    data = json.loads(report.read_text())
    console = data["device_model"]["console"]
    guest_bytes = sum(vcpu["guest"]["ops"]["uart_bytes"] for vcpu in data["vcpus"])
    assert console["written_bytes"] == 0 and console["lost_bytes"] == guest_bytes > 0
    assert console["write_errors"] > 0 and console["error"] == "No space left on device"
    lost = f"{guest_bytes} bytes of guest console output not written to /dev/full (No space left on device)"
    assert process.returncode == 1
    assert status_line(process.stderr) == f"mpvmm: time limit reached; {lost}; exit code 1"
    assert data["exit_code"] == 1 and data["output_errors"] == [lost]
    assert f"console: 0 bytes written, {guest_bytes} lost in {console['write_errors']} failed writes" in process.stdout


def test_console_write_errors_are_exported(tmp_path, no_leaks):
    samples = {}

    def scrape_while_it_runs(vm):
        deadline = time.monotonic() + 10
        while not series(samples, "mpvmm_console_lost_bytes_total") and time.monotonic() < deadline:
            time.sleep(0.2)
            samples.update(scrape_values(vm.metrics.url))
            if not next(iter(series(samples, "mpvmm_console_lost_bytes_total").values()), 0):
                samples.clear()

    config = RunConfig(workload="uart", seconds=0.5, console="/dev/full", metrics_port=0, memory=64 << 20)
    result = Supervisor(config, on_started=scrape_while_it_runs).run()
    (lost,) = series(samples, "mpvmm_console_lost_bytes_total").values()
    (errors,) = series(samples, "mpvmm_console_write_errors_total").values()
    (written,) = series(samples, "mpvmm_console_written_bytes_total").values()
    assert written == 0 and 0 < lost <= result.device_model["console"]["lost_bytes"]
    assert 0 < errors <= result.device_model["console"]["write_errors"]


def test_broken_stdout_pipe(spawn, tmp_path, no_leaks):
    """`mpvmm start ... | head -c 10`: the run ends as asked, no traceback, the report is written, exit 1."""
    report = tmp_path / "r.json"
    process = spawn([*MPVMM, "start", "--report", str(report), *RUN, "--seconds", "2"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()  # head leaves
    err = process.stderr.read()
    assert process.wait(timeout=30) == 1
    data = json.loads(report.read_text())
    lost = data["device_model"]["console"]["lost_bytes"]
    assert lost > 0
    errors = [f"{lost} bytes of guest console output not written to stdout (Broken pipe)",
              "summary not written to stdout (Broken pipe)"]
    assert status_line(err) == f"mpvmm: time limit reached; {'; '.join(errors)}; exit code 1"
    assert data["exit_code"] == 1 and data["output_errors"] == errors and len(data["vcpus"]) == 1


def test_closed_stdout(tmp_path, no_leaks):
    """`mpvmm start >&-`: no fd is mistaken for stdout, nothing crashes, the report says what was lost."""
    report = tmp_path / "r.json"
    process = subprocess.run(["bash", "-c", 'exec "$@" >&-', "mpvmm", *MPVMM, "start", "--report", str(report), *RUN],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=30)
    assert process.returncode == 1
    data = json.loads(report.read_text())
    lost = data["device_model"]["console"]["lost_bytes"]
    errors = [f"{lost} bytes of guest console output not written to stdout (Bad file descriptor)",
              "summary not written to stdout (Bad file descriptor)"]
    assert status_line(process.stderr) == f"mpvmm: time limit reached; {'; '.join(errors)}; exit code 1"
    assert data["output_errors"] == errors and data["not_collected"] == {}


def test_closed_stderr_loses_only_the_status_line(tmp_path, no_leaks):
    report = tmp_path / "r.json"
    process = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "mpvmm", *MPVMM, "start", "--report", str(report), *RUN],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
    assert process.returncode == 0
    assert "1 vCPUs, native runner, uart workload" in process.stdout
    assert json.loads(report.read_text())["status"] == "time limit reached"
