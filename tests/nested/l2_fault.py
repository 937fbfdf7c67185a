"""A fault injected into one mpvmm run inside L1, and what the run left behind (the nested soak).

``l2_run`` makes a ``FaultInjector`` from the request's ``fault`` entry,
``{"kind": ..., "delay": seconds, "pause": seconds}``, polls it while mpvmm
runs and adds its ``outcome`` to the result. The moment is counted from the
VM's start, seen as mpvmm's first vCPU thread (named ``vcpu0``: the VM is
built, its vCPUs about to run), so every fault lands in a running VM: in the
kernel's boot or in its init, as ``delay`` falls. Kinds:

- ``SIGINT``, ``SIGTERM``: that signal to mpvmm (the supervisor) alone;
- ``kill-device-model``: SIGKILL to mpvmm's device-model process;
- ``stop-device-model``: SIGSTOP to it, ``pause`` seconds, then SIGTERM to mpvmm;
- ``time-limit``, ``poweroff``: nothing to inject (``--seconds``, or init
  powers off); only the VM's start is timed.

Without a fault entry nothing is done and nothing is added. With one, once
mpvmm has exited, whatever of it is left in L1 is listed: ``/dev/shm`` and
``/dev/mqueue`` entries named ``mpvmm-*`` and live (not zombie) processes of
mpvmm's process group or running ``mpvmm`` modules. L1 runs nothing else of
mpvmm's, so each one is a leak.
"""

from __future__ import annotations

import os
import signal
import time

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
NOTHING_TO_INJECT = ("time-limit", "poweroff")
STOP_WAIT_SECONDS = 5.0  # SIGSTOP to the stopped state, under TCG


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _argv(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0")]
    except OSError:
        return []


def _has_thread(pid: int, name: str) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() == name:
                    return True
        except OSError:
            pass
    return False


def device_model_pid(supervisor: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(pid)
        if fields is not None and int(fields[1]) == supervisor and "mpvmm.devicemodel" in _argv(pid):
            return int(pid)
    return None


def leftovers(group: int) -> dict[str, list[str]]:
    """mpvmm's IPC names and live processes still in L1 (this process and its parents excepted)."""
    names = [f"{folder}/{name}" for folder in ("/dev/shm", "/dev/mqueue") if os.path.isdir(folder)
             for name in os.listdir(folder) if name.startswith("mpvmm-")]
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields, argv = _stat(pid), _argv(pid)
        if fields is None or fields[0] in ("Z", "X") or int(pid) in (os.getpid(), os.getppid()):
            continue
        if int(fields[2]) == group or any(part == "mpvmm" or part.startswith("mpvmm.") for part in argv):
            processes.append(f"{pid} {' '.join(argv).strip()}")
    return {"ipc": names, "processes": processes}


class FaultInjector:
    def __init__(self, spec: dict | None, process, started: float):
        self.spec = spec
        self.process = process
        self.started = started
        self.vm_started: float | None = None  # seconds from mpvmm's start
        self.injected: float | None = None
        self.notes: dict = {}

    def poll(self, elapsed: float) -> None:
        """Called every poll while mpvmm runs; ``elapsed``: seconds since its start."""
        if self.spec is None or self.injected is not None:
            return
        if self.vm_started is None:
            if _has_thread(self.process.pid, "vcpu0"):
                self.vm_started = elapsed
            return
        kind = self.spec["kind"]
        if kind in NOTHING_TO_INJECT or elapsed < self.vm_started + self.spec["delay"]:
            return
        self.injected = time.monotonic() - self.started
        if kind in SIGNALS:
            self.process.send_signal(SIGNALS[kind])
            return
        target = device_model_pid(self.process.pid)
        self.notes["device_model"] = target
        if target is None:  # gone already: the run is ending by itself
            return
        if kind == "kill-device-model":
            os.kill(target, signal.SIGKILL)
        elif kind == "stop-device-model":
            os.kill(target, signal.SIGSTOP)
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while (_stat(target) or ["T"])[0] not in ("T", "t") and time.monotonic() < deadline:
                time.sleep(0.01)
            self.notes["stopped"] = (_stat(target) or ["gone"])[0]
            time.sleep(self.spec.get("pause", 0))
            self.injected = time.monotonic() - self.started  # the SIGTERM is what must end the run
            self.process.send_signal(signal.SIGTERM)
        else:
            raise ValueError(f"unknown fault {kind!r}")

    def outcome(self, ended: float) -> dict:
        """What was done and when (seconds from mpvmm's start), and what mpvmm left in L1."""
        if self.spec is None:
            return {}
        return {"fault": {"kind": self.spec["kind"], "vm_started": self.vm_started, "injected": self.injected,
                          "ended": ended, **self.notes},
                "leftovers": leftovers(self.process.pid)}
