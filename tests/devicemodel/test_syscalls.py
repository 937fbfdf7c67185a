"""The seccomp allow-list against what real device models call, recorded with strace.

The device model runs under strace from its first instruction (no ptrace
attach, so no capability is needed and its uid change does not matter),
and what it calls after its filter is loaded is exactly what the filter
sees. The runs exercise what a device model does: every device of the
Linux machine with terminal input (more than the FIFO holds, then a hang-up),
irqfds and the RTC's update and alarm interrupts (the loop waking for a
device timer), malformed messages, power events, stats, shutdown; and a real VM
with a hostile guest while /metrics is scraped. A syscall the device model
starts to need shows up here as a failure naming it, not as an EPERM in
someone's run.
"""

import collections
import fcntl
import os
import re
import select
import shutil
import stat
import struct
import sys
import termios
import time
import tty
import urllib.request
from pathlib import Path

import pytest

from mpvmm.devicemodel import rtc
from mpvmm.devicemodel.protocol import KIND_READ, KIND_WRITE, KIND_WRITE_ACKED, SPACE_MMIO, SPACE_PIO
from mpvmm.devicemodel.syscall_filter import ALLOWED_SYSCALLS
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.x86.layout import (ACPI_PM_PORT, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT,
                              MMIO_TESTDEV_ADDR, MMIO_TESTDEV_DOORBELL_ADDR, PIO_TESTDEV_DOORBELL_PORT,
                              PIO_TESTDEV_PORT, RTC_PORT)
from tests.devicemodel.test_coalesced import Kvm as CoalescedProducer
from tests.devicemodel.test_process import Harness, _ring_page, _stats_until

SYSCALL = re.compile(r"^\d+\s+([a-z0-9_]+)\(")
# libseccomp loads the filter with seccomp(2), or prctl(2) on old kernels.
FILTER_LOADED = re.compile(r"^\d+\s+(seccomp\(SECCOMP_SET_MODE_FILTER, 0,|prctl\(PR_SET_SECCOMP, SECCOMP_MODE_FILTER).* = 0$")
UART_IER, UART_IIR, UART_LSR = 1, 2, 5


def unread(terminal_fd: int) -> int:
    """Bytes typed on the terminal that no one has read yet."""
    return struct.unpack("i", fcntl.ioctl(terminal_fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def strace_prefix(output: Path) -> list[str]:
    """The command prefix that runs a program under strace, following forks, into ``output``."""
    path = shutil.which("strace")
    if path is None:
        pytest.fail("strace is not installed: run scripts/install.sh (Debian package strace)")
    return [path, "-f", "-qq", "-o", str(output)]


def sandboxed_calls(output: Path) -> collections.Counter:
    """The syscalls in an strace log after the last seccomp filter was loaded, by name."""
    lines = output.read_text().splitlines()
    loaded = [index for index, line in enumerate(lines) if FILTER_LOADED.match(line)]
    assert loaded, "the device model never loaded its seccomp filter"
    calls = collections.Counter()
    for line in lines[loaded[-1] + 1:]:
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
    irqfds = {"com1": os.eventfd(0), "i8042": os.eventfd(0), "rtc": os.eventfd(0)}
    terminal, follower = os.openpty()
    tty.setraw(follower)  # as the supervisor leaves a terminal: bytes, not lines
    try:
        harness.start(pass_fds=(*irqfds.values(), follower), prefix=strace_prefix(tmp_path / "strace.txt"))
        ready = harness.configure(console=str(tmp_path / "console"), machine="pc", irqfds=irqfds, stdin_fd=follower)
        assert ready["op"] == "ready", ready
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
        os.write(terminal, b"k" * 200)  # more than the FIFO holds: the rest waits in the device model
        deadline = time.monotonic() + 5
        while not read(COM1_PORT + UART_LSR) & 1 or unread(follower):
            assert time.monotonic() < deadline, f"terminal input stalled: {unread(follower)} bytes unread"
            time.sleep(0.01)
        received = bytes(read(COM1_PORT) for _ in range(200))  # fed into the FIFO as the guest reads
        assert received == b"k" * 200
        os.close(terminal)  # the terminal hangs up: input leaves the poll set for good
        terminal = None
        read(COM1_PORT + UART_LSR)  # one more round of the loop after the hang-up
        write(RTC_PORT, 0)
        read(RTC_PORT + 1)
        for register in (rtc.REG_SECONDS_ALARM, rtc.REG_MINUTES_ALARM, rtc.REG_HOURS_ALARM):
            write(RTC_PORT, register)
            write(RTC_PORT + 1, rtc.ALARM_ANY)  # an alarm every second
        # Flags of update cycles that ended while the alarm was half written
        # (UF without AF) would raise the interrupt at once: clear them first.
        write(RTC_PORT, rtc.REG_STATUS_C)
        read(RTC_PORT + 1)
        write(RTC_PORT, rtc.REG_STATUS_B)
        write(RTC_PORT + 1, rtc.STATUS_B_24H | rtc.STATUS_B_UIE | rtc.STATUS_B_AIE)
        # No access until the interrupt: the loop's own timer runs the update cycle.
        assert select.select([irqfds["rtc"]], [], [], 3.0)[0] == [irqfds["rtc"]], "no RTC interrupt"
        write(RTC_PORT, rtc.REG_STATUS_C)
        assert read(RTC_PORT + 1) == rtc.STATUS_C_IRQF | rtc.STATUS_C_AF | rtc.STATUS_C_UF
        write(I8042_COMMAND_PORT, 0x20)
        read(I8042_DATA_PORT)
        read(PIO_TESTDEV_PORT, size=4, queue=1)
        read(MMIO_TESTDEV_ADDR, space=SPACE_MMIO, size=8, queue=1)
        harness.requests[1].send(b"\xc1")  # malformed
        write(ACPI_PM_PORT, 0x20 | 5 << 2)  # S5: a system event to the supervisor
        write(I8042_COMMAND_PORT, 0xFE)  # reset: another
        harness.send({"op": "stats"})
        harness.send({"op": "what"})
        harness.send({"op": "shutdown"})
        # The two writes above are posted: their events may come before or after the stats.
        answers = [harness.recv()["op"] for _ in range(5)]
        assert sorted(answers) == ["bye", "error", "stats", "system_event", "system_event"], answers
        assert answers[-1] == "bye" and answers.index("stats") < answers.index("error"), answers
        assert harness.proc.wait(10) == 0  # strace's status is the device model's
    finally:
        harness.close()
        for fd in (*irqfds.values(), terminal, follower):
            if fd is not None:
                os.close(fd)
    calls = sandboxed_calls(tmp_path / "strace.txt")
    assert_allowed(calls)
    # The recording saw the device model at work, not an idle process.
    assert {"epoll_wait", "epoll_ctl", "mq_timedreceive", "mq_timedsend", "read", "write",
            "recvfrom", "sendto", "exit_group"} <= set(calls)


def test_ring_transport_and_in_kernel_routes_call_only_allowed_syscalls(tmp_path):
    """The ring transport (polling, wake-ups both ways), KVM's coalesced ring and doorbell eventfds."""
    harness = Harness(transport="ring")
    ring_fd, page = _ring_page()
    kvm = CoalescedProducer(page)
    bells = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        harness.start(pass_fds=(ring_fd, *bells), prefix=strace_prefix(tmp_path / "strace.txt"))
        ready = harness.configure(console=str(tmp_path / "console"), coalesced_ring=[ring_fd, 2],
                                  doorbells=[[bells[0], SPACE_PIO, PIO_TESTDEV_DOORBELL_PORT],
                                             [bells[1], SPACE_MMIO, MMIO_TESTDEV_DOORBELL_ADDR]])
        assert ready["op"] == "ready", ready
        for seq in range(1, 200):  # back to back: found while it polls; then apart: it sleeps and is woken
            for value in range(4):
                assert kvm.write(PIO_TESTDEV_PORT, 4, value, pio=True)
            harness.request(seq % 2, KIND_READ, seq % 2, SPACE_PIO, PIO_TESTDEV_PORT, 4, 0, seq)
            assert harness.reply(seq % 2)[0] == seq
            if seq % 50 == 0:
                time.sleep(0.05)
        harness.request(0, KIND_WRITE_ACKED, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 9, 500)  # a full ring's fallback
        assert harness.reply(0) == (500, 0)
        for _ in range(40):  # more than a request ring holds: the vCPU waits for room, and is woken
            harness.request(1, KIND_WRITE, 1, SPACE_PIO, COM1_PORT, 1, ord("x"), 0)
        os.eventfd_write(bells[0], 2)
        os.eventfd_write(bells[1], 1)
        stats = _stats_until(harness, lambda s: sum(s["stats"]["doorbells"].values()) == 3
                             and s["process"]["received"][1] == 140)
        process = stats["process"]
        assert process["coalesced_ring"]["entries"] == 4 * 199 and process["polled_hits"] > 0
        assert process["wakeups"] > 0 and process["received"] == [100, 140]
        harness.send({"op": "shutdown"})
        assert harness.recv()["op"] == "bye"
        assert harness.proc.wait(10) == 0
    finally:
        kvm.header = None
        page.close()
        harness.close()
        for fd in (ring_fd, *bells):
            os.close(fd)
    calls = sandboxed_calls(tmp_path / "strace.txt")
    assert_allowed(calls)
    assert {"epoll_wait", "sched_yield", "futex", "read", "recvfrom", "sendto", "exit_group"} <= set(calls)


@pytest.mark.parametrize("runner, transport, workload", [
    ("native", "mq", "hostile"), ("native", "ring", "hostile"), ("process", "ring", "hostile"),
    ("native", "ring", "doorbell"),
])
def test_vm_run_calls_only_allowed_syscalls(runner, transport, workload, tmp_path, monkeypatch, no_leaks):
    """A guest's flood (hostile) or its doorbells and coalesced writes while /metrics asks for stats."""
    # The supervisor starts `sys.executable -m mpvmm.devicemodel`: here, under strace.
    output = tmp_path / "strace.txt"
    wrapper = tmp_path / "python-under-strace"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join([*strace_prefix(output), sys.executable]) + ' "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(wrapper))

    def scrape(vm):
        for _ in range(3):
            time.sleep(0.3)
            with urllib.request.urlopen(vm.metrics.url, timeout=10) as response:
                assert b"mpvmm_device_requests_total" in response.read()

    config = RunConfig(cpus=2, memory=64 << 20, workload=workload, seconds=1.5, runner=runner,
                       transport=transport, console=str(tmp_path / "console"), metrics_port=0)
    result = Supervisor(config, on_started=scrape).run()
    assert result.exit_code == 0, result.status
    calls = sandboxed_calls(output)
    assert_allowed(calls)
    served = {"mq_timedreceive", "mq_timedsend"} if transport == "mq" else {"futex"}
    assert {"epoll_wait", "write", "recvfrom", "sendto", "exit_group", *served} <= set(calls)
    if workload == "doorbell":
        assert sum(result.device_model["doorbells"].values()) > 0 and "read" in calls


def test_allow_list_is_documented():
    """docs/security.md's table names exactly the syscalls the filter allows."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    table = text.split("<!-- allow-list:", 1)[1].split("<!-- end of allow-list -->", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M)
    assert sorted(documented) == sorted(ALLOWED_SYSCALLS)
    assert f"It has {len(ALLOWED_SYSCALLS)} entries" in text
