"""The device model's confinement, applied in a throwaway process."""

import subprocess
import sys

from mpvmm.devicemodel.sandbox import DENIED_SYSCALLS

PROBE = r"""
import os, socket, sys
from mpvmm.devicemodel.sandbox import confine
confine()
results = []
for name, attempt in [
    ("exec", lambda: os.execv("/bin/true", ["true"])),
    ("fork", os.fork),
    ("socket", lambda: socket.socket()),
    ("kill", lambda: os.kill(1, 0)),
]:
    try:
        attempt()
        results.append(f"{name}:allowed")
    except PermissionError:
        results.append(f"{name}:denied")
with open("/proc/self/status") as f:
    status = dict(line.split(":", 1) for line in f if ":" in line)
results.append("nnp:" + status["NoNewPrivs"].strip())
results.append("seccomp:" + status["Seccomp"].strip())
with open(__file__ if "__file__" in globals() else "/proc/self/cmdline", "rb") as f:
    results.append("read:ok" if f.read(1) is not None else "read:no")
print(" ".join(results))
"""


def test_confined_process_cannot_exec_fork_network_or_signal_but_still_works():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["exec:denied", "fork:denied", "socket:denied", "kill:denied",
                                  "nnp:1", "seccomp:2", "read:ok"]


def test_the_deny_list_names_the_dangerous_syscalls():
    assert {"execve", "execveat", "fork", "clone", "clone3", "socket", "ptrace", "bpf"} <= set(DENIED_SYSCALLS)
