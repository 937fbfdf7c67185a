"""A helper process the supervisor started: how it is spawned, whether it lives, how it ended.

The device model (device_model_client.py) and each virtio device process
(process_control.py) are ``python -m MODULE FD ...`` children holding one
end of a control socketpair and the descriptors they need. Both are
spawned with the stop signals blocked across the fork: the signals are the
supervisor's (stop_signals.py), so none sent to the process group may kill
a child's interpreter while it starts; the child ignores them, discarding
any pending, before it unblocks them, and the supervisor still gets each
one (another thread takes it, or it arrives when unblocked here).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence

from mpvmm.errors import DeviceModelError
from mpvmm.stop_signals import STOP_SIGNALS

RECEIVE_SIZE = 65536


def spawn(module: str, args: Sequence[str], pass_fds: Sequence[int]) -> subprocess.Popen:
    """``python -m module args...`` inheriting ``pass_fds``, stdin /dev/null, the stop signals blocked across the fork."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen([sys.executable, "-m", module, *args], pass_fds=tuple(pass_fds),
                                stdin=subprocess.DEVNULL)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def is_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, SIGTSTP) or held by a tracer: it cannot answer."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


class ChildProcess:
    """Liveness of ``self.process``, the child's Popen (None until spawned)."""

    process: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stopped(self) -> bool:
        """Alive but stopped (SIGSTOP, SIGTSTP, a debugger): it answers nothing until resumed."""
        return self.alive() and is_stopped(self.process.pid)

    def describe_exit(self) -> str:
        if self.process is None:
            return "never started"
        code = self.process.poll()
        if code is None:
            return "stopped" if is_stopped(self.process.pid) else "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def kill(self) -> None:
        """Kill it if still running, and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def receive_some(control: socket.socket, seconds: float, who: str, describe_exit: Callable[[], str]) -> bytes | None:
    """What ``control`` gives within ``seconds``: None if nothing came; DeviceModelError if the child is gone."""
    control.settimeout(seconds)
    try:
        data = control.recv(RECEIVE_SIZE)
    except TimeoutError:
        return None
    except OSError as err:
        raise DeviceModelError(f"{who} is gone: {err.strerror}") from err
    if not data:
        raise DeviceModelError(f"{who} exited ({describe_exit()})")
    return data
