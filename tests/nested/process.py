"""Child processes that cannot outlive the test process: own process group, parent-death signal.

QEMU (and whatever it might start) runs in a session of its own, so one
``killpg`` ends all of it, and with PR_SET_PDEATHSIG = SIGKILL, so the kernel
kills it when the thread that started it dies, even by SIGKILL, when no
Python cleanup runs. Start such children from the main thread: the signal
follows the starting *thread*, not the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with(parent: int):
    def preexec() -> None:
        # Runs in the child between fork and exec (after setsid).
        if _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would kill us
            os._exit(126)

    return preexec


def spawn(argv: list[str], **popen_kwargs) -> subprocess.Popen:
    """Popen in a new session that the kernel kills when this process dies."""
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with(os.getpid()), **popen_kwargs)


def kill_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the child's whole group, SIGKILL after ``grace`` seconds, then reap it."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if process.poll() is not None and not _group_alive(process.pid):
                return
            time.sleep(0.05)
    process.wait(timeout=5)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
