"""Runs one mpvmm VM (the L2) inside L1, bounded, and reports what happened as JSON.

    python -m tests.nested.l2_run REQUEST.json

It is started by ``NestedLinux.boot`` through L1's agent. The request names
the mpvmm argv, the bound, where the guest console goes (``--console FILE``,
or mpvmm's stdout, or a pseudo-terminal for the interactive tests), marker
texts whose first appearance it times (the boot phases), a metrics port to
scrape during the boot, and, for a terminal, steps of "wait for this text,
then type that" or "... then run these ``mpvmm ctl`` commands" (a failing one
ends the run). The result: exit status, stderr (stdout is in the
``console_copy`` file: the console itself, or what mpvmm printed beside a
console file), the seconds at which each phase appeared and each step was
taken, each ctl command's outcome, the last scrape, the terminal's mode
before and after, and ``timed_out`` when mpvmm outlived the bound: then
``hang`` says what its threads and L1's KVM were doing (two samples), its
process group gets SIGTERM (for mpvmm's summary) and then SIGKILL, and the
host reports the layer "L2". A ``fault`` entry injects a
fault at a moment of the run and lists what mpvmm left behind
(``l2_fault``, for the nested soak).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import threading
import time
import urllib.request

from tests.nested.l2_fault import FaultInjector

POLL_SECONDS = 0.2
SCRAPE_TIMEOUT = 10.0
# A run past its bound: two samples this far apart say which threads still
# use CPU and whether KVM still sees exits, then SIGTERM gets mpvmm's own
# summary (each vCPU's exits) within HANG_TERM_SECONDS, then SIGKILL.
HANG_SAMPLE_SECONDS = 2.0
HANG_TERM_SECONDS = 15.0
KVM_DEBUGFS = "/sys/kernel/debug/kvm"
KVM_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_injections", "irq_window_exits",
                "nmi_injections", "request_irq_exits", "signal_exits", "halt_wakeup")


class _Output:
    """The guest console as it grows, from a file mpvmm writes or from a pipe or pty we drain."""

    def __init__(self, path: str, fd: int | None = None):
        self.path = path
        self._fd = fd
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        if fd is not None:
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        with open(self.path, "ab") as copy:
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except OSError:  # EIO: the pty's other side is closed
                    return
                if not data:
                    return
                copy.write(data)
                copy.flush()
                with self._lock:
                    self._chunks.append(data)

    def text(self) -> str:
        if self._fd is None:
            try:
                with open(self.path, "rb") as f:
                    return f.read().decode(errors="replace")
            except FileNotFoundError:
                return ""
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def join(self) -> None:
        if self._fd is not None:
            self._thread.join(timeout=5)


def _threads(pgid: int) -> dict[str, str]:
    """Every thread of process group ``pgid``: "pid/tid comm" -> "state wchan cpu-ticks"."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            for tid in os.listdir(f"/proc/{pid}/task"):
                task = f"/proc/{pid}/task/{tid}"
                with open(f"{task}/stat") as f:
                    stat = f.read()
                with open(f"{task}/wchan") as f:
                    wchan = f.read() or "-"
                comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
                found[f"{pid}/{tid} {comm}"] = f"{fields[0]} {wchan} {int(fields[11]) + int(fields[12])}"
        except OSError:  # gone meanwhile
            continue
    return found


def _kvm_counters() -> dict[str, int]:
    """L1's KVM counters, summed over its VMs (debugfs, mounted if it is not)."""
    if not os.path.isdir(KVM_DEBUGFS):
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"], capture_output=True)
    counters = {}
    for name in KVM_COUNTERS:
        try:
            with open(os.path.join(KVM_DEBUGFS, name)) as f:
                counters[name] = int(f.read())
        except (OSError, ValueError):
            continue
    return counters


def _hang_diagnosis(process: subprocess.Popen) -> dict:
    """What a run past its bound was doing: threads and KVM counters twice, then mpvmm's own summary."""
    first = {"threads": _threads(process.pid), "kvm": _kvm_counters()}
    time.sleep(HANG_SAMPLE_SECONDS)
    second = {"threads": _threads(process.pid), "kvm": _kvm_counters()}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=HANG_TERM_SECONDS)
        ended_by = "SIGTERM"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        ended_by = "SIGKILL"
    return {"first": first, "second": second, "sample_seconds": HANG_SAMPLE_SECONDS, "ended_by": ended_by}


def _controlling_terminal() -> None:
    """In the child, after setsid: the pty on fd 0 becomes its terminal, its group the foreground."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as response:
        return response.read().decode()


def _every_vcpu_exited(text: str, cpus: int) -> bool:
    for vcpu in range(cpus):
        total = 0.0
        for line in text.splitlines():
            if line.startswith("mpvmm_vcpu_exits_total{") and f'vcpu="{vcpu}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        if total <= 0:
            return False
    return True


def _seen_phases(request: dict, text: str, phases: dict[str, float], now: float) -> None:
    """Time each phase whose marker starts a console line (after the kernel's timestamp, if any),
    so that init echoing a kernel line from dmesg is not taken for the kernel printing it."""
    for phase, marker in request.get("phases", {}).items():
        if phase not in phases and re.search(rf"^(\[ *[0-9.]+\] )?{re.escape(marker)}", text, re.MULTILINE):
            phases[phase] = now


def _ctl(commands: list[list[str]], deadline: float) -> list[dict]:
    """Run each command (an ``mpvmm ctl`` argv) in order, all by ``deadline``; stop at the first
    that fails. Each result: its argv, status, output and seconds."""
    results = []
    for argv in commands:
        started = time.monotonic()
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=max(1.0, deadline - started))
            status, stdout, stderr = done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as err:
            status, stdout, stderr = None, str(err.stdout or ""), f"timed out: {err}"
        results.append({"argv": argv, "status": status, "stdout": stdout, "stderr": stderr,
                        "seconds": time.monotonic() - started})
        if status != 0:
            break
    return results


def run(request: dict) -> dict:
    console_path = request["console_copy"]
    pty = request.get("pty")
    leader = follower = None
    popen = {"stdin": subprocess.DEVNULL, "stderr": subprocess.PIPE, "start_new_session": True}
    if pty is not None:
        leader, follower = os.openpty()
        popen.update(stdin=follower, stdout=follower, preexec_fn=_controlling_terminal)
        mode_before = termios.tcgetattr(follower)
    else:
        popen["stdout"] = subprocess.PIPE
    started = time.monotonic()
    process = subprocess.Popen(request["argv"], **popen)
    stdout = None  # mpvmm's stdout, kept apart when the console goes to a file
    if pty is not None:
        output = _Output(console_path, leader)
    elif request.get("console") is None:
        output = _Output(console_path, process.stdout.fileno())
    else:
        output = _Output(request["console"])
        stdout = _Output(console_path, process.stdout.fileno())
    stderr_chunks: list[bytes] = []
    stderr_reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    stderr_reader.start()
    fault = FaultInjector(request.get("fault"), process, started)

    phases: dict[str, float] = {}
    steps = list(pty["steps"]) if pty is not None else []
    step_times: list[float] = []
    ctl_results: list[dict] = []
    metrics = request.get("metrics")
    scraped, scrape_error = None, None
    timed_out, hang = False, None
    while process.poll() is None:
        elapsed = time.monotonic() - started
        if elapsed > request["bound"]:
            timed_out = True
            hang = _hang_diagnosis(process)
            break
        text = output.text()
        _seen_phases(request, text, phases, elapsed)
        if steps and steps[0]["wait"] in text:
            step = steps.pop(0)
            step_times.append(elapsed)
            if "send" in step:
                os.write(leader, step["send"].encode())
            else:
                ctl_results += _ctl(step["ctl"], started + request["bound"])
                if ctl_results[-1]["status"] != 0:  # nothing more will happen: end it now
                    os.killpg(process.pid, signal.SIGKILL)
                    break
        if metrics is not None and metrics["after"] in text and (
                scraped is None or not _every_vcpu_exited(scraped, metrics["cpus"])):
            try:
                scraped = _scrape(metrics["port"])
            except OSError as err:
                scrape_error = str(err)
        fault.poll(elapsed)
        time.sleep(POLL_SECONDS)
    status = process.wait()
    seconds = time.monotonic() - started
    stderr_reader.join(timeout=10)
    result = {"status": status, "seconds": seconds, "timed_out": timed_out, "phases": phases,
              "stderr": b"".join(stderr_chunks).decode(errors="replace"), "metrics": scraped,
              "scrape_error": scrape_error, "steps_left": [step["wait"] for step in steps],
              "step_times": step_times, "ctl": ctl_results, "hang": hang, **fault.outcome(seconds)}
    if pty is not None:
        result["terminal_restored"] = termios.tcgetattr(follower) == mode_before
        os.close(follower)
        output.join()
        os.close(leader)
    else:
        output.join()
    if stdout is not None:
        stdout.join()
    _seen_phases(request, output.text(), phases, seconds)  # the last lines, read after the exit
    return result


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        request = json.load(f)
    result = run(request)
    tmp = request["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, request["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
