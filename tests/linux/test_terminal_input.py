"""A kernel run on a real terminal: Ctrl-C stops it whatever the amount of typed input waiting.

The terminal is a pty whose follower is the run's controlling terminal and
stdin, as in a shell. The kernel only needs to be booting: it does not read
the UART yet, so everything typed piles up behind its 64-byte FIFO.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import time

import pytest

MPVMM = [sys.executable, "-m", "mpvmm"]
START_BOUND_SECONDS = 60
N_TTY_BUF_SIZE = 4096  # the line discipline's input buffer (drivers/tty/n_tty.c)
# Ctrl-C to the end of the run: the kernel's vCPUs are stopped at once (no grace).
STOP_BOUND_SECONDS = 30


def _controlling_terminal() -> None:
    """In the child, after setsid: make stdin (the pty follower) the session's terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _type(leader: int, data: bytes, bound: float) -> int:
    """Write as much of ``data`` as the terminal takes within ``bound`` seconds; how much it took."""
    written, deadline = 0, time.monotonic() + bound
    while written < len(data) and time.monotonic() < deadline:
        try:
            written += os.write(leader, data[written:written + 1024])
        except BlockingIOError:
            time.sleep(0.05)
    return written


@pytest.mark.parametrize("typed", [4000, 16384])
def test_ctrl_c_stops_a_kernel_run_whatever_is_typed_ahead(typed, debian_kernel, spawn, tmp_path):
    leader, follower = os.openpty()
    try:
        os.set_blocking(leader, False)
        before = termios.tcgetattr(follower)
        process = spawn([*MPVMM, "start", "--kernel", debian_kernel, "--cpus", "1", "--memory", "256M",
                         "--console", str(tmp_path / "console.log"), "--no-metrics",
                         "--report", str(tmp_path / "report.json")],
                        stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        start_new_session=True, preexec_fn=_controlling_terminal)
        console = tmp_path / "console.log"
        deadline = time.monotonic() + START_BOUND_SECONDS
        # Raw mode on, and the console opened by a configured device model: the kernel is booting.
        while termios.tcgetattr(follower)[3] & termios.ICANON or not console.exists():
            assert process.poll() is None and time.monotonic() < deadline, "the VM never started"
            time.sleep(0.05)
        time.sleep(0.5)
        # More than the line discipline's 4 KiB buffer in the second case: before the
        # device model read the terminal whatever the FIFO held, Ctrl-C then went unseen.
        assert _type(leader, b"k" * typed, 10) == typed
        assert _type(leader, b"\x03", 10) == 1
        sent = time.monotonic()
        _out, err = process.communicate(timeout=STOP_BOUND_SECONDS)
        print(f"{typed} bytes typed ahead: stopped {time.monotonic() - sent:.2f} s after Ctrl-C")
        assert process.returncode == 128 + signal.SIGINT, err
        assert err.decode().splitlines()[-1] == "mpvmm: stopped by SIGINT; exit code 130"
        assert termios.tcgetattr(follower) == before
        # The line discipline took Ctrl-C in only behind everything typed before it, holding at
        # most its 4 KiB buffer unread (flushed at Ctrl-C): the device model read the rest.
        terminal_input = json.loads((tmp_path / "report.json").read_text())["device_model"]["terminal_input"]
        assert typed - N_TTY_BUF_SIZE <= terminal_input["read_bytes"] <= typed
        assert terminal_input["dropped_bytes"] == 0
    finally:
        os.close(leader)
        os.close(follower)
