"""The seccomp allow-list against what real device models call, recorded with strace.

strace attaches to a device model once it is sandboxed (after ``ready``),
so what it records is exactly what the filter sees. The runs exercise what
a device model does: every device of the Linux machine with terminal input
(including the FIFO filling up) and irqfds, malformed messages, power
events, stats, shutdown; and a real VM with a hostile guest while
/metrics is scraped. A syscall the device model starts to need shows up
here as a failure naming it, not as an EPERM in someone's run.
"""

import collections
import os
import re
import shutil
import subprocess
import time
import tty
import urllib.request
from pathlib import Path

import pytest

from mpvmm.devicemodel.protocol import KIND_READ, KIND_WRITE, SPACE_MMIO, SPACE_PIO
from mpvmm.devicemodel.syscall_filter import ALLOWED_SYSCALLS
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.x86.layout import (ACPI_PM_PORT, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT,
                              MMIO_TESTDEV_ADDR, PIO_TESTDEV_PORT, RTC_PORT)
from tests.devicemodel.test_process import Harness

SYSCALL = re.compile(r"^\d+\s+([a-z0-9_]+)\(")
ATTACH_TIMEOUT = 10.0
UART_IER, UART_IIR, UART_LSR = 1, 2, 5


def strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.fail("strace is not installed: run scripts/install.sh (Debian package strace)")
    return path


class Recording:
    """strace on ``pid`` from now until it exits; ``calls`` counts syscalls by name."""

    def __init__(self, pid: int, output):
        self.pid = pid
        self.output = output
        self.process = subprocess.Popen([strace(), "-f", "-qq", "-o", str(output), "-p", str(pid)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while self._tracer() != self.process.pid:
            assert self.process.poll() is None, f"strace failed: {self.process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.01)

    def _tracer(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))

    def finish(self) -> collections.Counter:
        """Wait for strace to see the device model exit; the syscalls it recorded."""
        try:
            self.process.wait(ATTACH_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.terminate()  # detaches
                self.process.wait()
            self.process.stderr.close()
        calls = collections.Counter()
        with open(self.output) as f:
            for line in f:
                match = SYSCALL.match(line)
                if match:
                    calls[match.group(1)] += 1
        return calls


def assert_allowed(calls: collections.Counter) -> None:
    outside = {name: count for name, count in calls.items() if name not in ALLOWED_SYSCALLS}
    assert outside == {}, f"the device model called syscalls its seccomp filter denies: {outside}"
    print(f"recorded {sum(calls.values())} calls of {len(calls)} syscalls: {dict(calls)}")


def test_linux_machine_calls_only_allowed_syscalls(tmp_path):
    harness = Harness()
    irqfds = {"com1": os.eventfd(0), "i8042": os.eventfd(0)}
    terminal, follower = os.openpty()
    tty.setraw(follower)  # as the supervisor leaves a terminal: bytes, not lines
    try:
        harness.start(pass_fds=(*irqfds.values(), follower))
        ready = harness.configure(console=str(tmp_path / "console"), machine="pc", irqfds=irqfds, stdin_fd=follower)
        assert ready["op"] == "ready", ready
        recording = Recording(harness.proc.pid, tmp_path / "strace.txt")
        sequence = iter(range(1, 1 << 30))

        def write(port, value, space=SPACE_PIO, size=1):
            harness.request(0, KIND_WRITE, 0, space, port, size, value, 0)

        def read(port, space=SPACE_PIO, size=1, queue=0):
            seq = next(sequence)
            harness.request(queue, KIND_READ, queue, space, port, size, 0, seq)
            answer_seq, value = harness.reply(queue)
            assert answer_seq == seq
            return value

        write(COM1_PORT + UART_IER, 0x0F)  # every UART interrupt: irqfd writes
        for byte in b"console line\n":
            write(COM1_PORT, byte)
        read(COM1_PORT + UART_IIR)
        os.write(terminal, b"k" * 200)  # more than the FIFO holds: input leaves the poll set
        deadline = time.monotonic() + 5
        while not read(COM1_PORT + UART_LSR) & 1:
            assert time.monotonic() < deadline, "terminal input never reached the UART"
        for _ in range(200):  # the guest drains it: input comes back into the poll set
            read(COM1_PORT)
        write(RTC_PORT, 0)
        read(RTC_PORT + 1)
        write(I8042_COMMAND_PORT, 0x20)
        read(I8042_DATA_PORT)
        read(PIO_TESTDEV_PORT, size=4, queue=1)
        read(MMIO_TESTDEV_ADDR, space=SPACE_MMIO, size=8, queue=1)
        harness.requests[1].send(b"\xc1")  # malformed
        write(ACPI_PM_PORT, 0x20 | 5 << 2)  # S5: a system event to the supervisor
        write(I8042_COMMAND_PORT, 0xFE)  # reset: another
        assert harness.stats()["op"] == "stats"
        harness.send({"op": "what"})
        harness.send({"op": "shutdown"})
        answers = [harness.recv() for _ in range(4)]
        assert [answer["op"] for answer in answers] == ["system_event", "system_event", "error", "bye"], answers
        assert harness.proc.wait(10) == 0
        calls = recording.finish()
    finally:
        harness.close()
        for fd in (*irqfds.values(), terminal, follower):
            os.close(fd)
    assert_allowed(calls)
    # The recording saw the device model at work, not an idle process.
    assert {"epoll_wait", "epoll_ctl", "mq_timedreceive", "mq_timedsend", "read", "write",
            "recvfrom", "sendto", "exit_group"} <= set(calls)


@pytest.mark.parametrize("runner", ["native", "process"])
def test_vm_run_calls_only_allowed_syscalls(runner, tmp_path, no_leaks):
    """A hostile guest's flood while /metrics asks the device model for its stats."""
    recordings = []

    def record_and_scrape(supervisor):
        recordings.append(Recording(supervisor.device_model.pid, tmp_path / "strace.txt"))
        for _ in range(3):
            time.sleep(0.3)
            with urllib.request.urlopen(supervisor.metrics.url, timeout=10) as response:
                assert b"mpvmm_device_requests_total" in response.read()

    config = RunConfig(cpus=2, memory=64 << 20, workload="hostile", seconds=1.5, runner=runner,
                       console=str(tmp_path / "console"), metrics_port=0)
    result = Supervisor(config, on_started=record_and_scrape).run()
    assert result.exit_code == 0, result.status
    calls = recordings[0].finish()
    assert_allowed(calls)
    assert {"epoll_wait", "mq_timedreceive", "mq_timedsend", "write", "recvfrom", "sendto",
            "exit_group"} <= set(calls)


def test_allow_list_is_documented():
    """docs/security.md's table names exactly the syscalls the filter allows."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    table = text.split("<!-- allow-list:", 1)[1].split("<!-- end of allow-list -->", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M)
    assert sorted(documented) == sorted(ALLOWED_SYSCALLS)
    assert f"It has {len(ALLOWED_SYSCALLS)} entries" in text
