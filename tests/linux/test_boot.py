"""Booting Debian 12's cloud kernel: the banner in the normal suite, init in the slow one.

Measured on the 2-core development machine (KVM nested on PVM, ring 0
emulated): see the README's "Booting Linux". On hardware KVM the whole
boot takes about a second.
"""

import signal
import subprocess
import sys
import time

import pytest

MPVMM = [sys.executable, "-m", "mpvmm"]
BANNER = b"Linux version"
# The line after the banner: waiting for it (not the banner) before SIGTERM means
# the stop cannot race the kernel's next printk (CI once stopped it mid-line).
COMMAND_LINE = b"Command line: console=ttyS0 earlyprintk=ttyS0"
BANNER_BOUND_SECONDS = 180  # measured 14 s to the banner here (34 s beside another boot); generous for CI
FULL_BOOT_BOUND_SECONDS = 1500


def _wait_for(path, needle, process, bound):
    started = time.monotonic()
    while time.monotonic() - started < bound:
        if process.poll() is not None:
            break
        try:
            with open(path, "rb") as f:
                if needle in f.read():
                    return time.monotonic() - started
        except FileNotFoundError:
            pass
        time.sleep(0.2)
    return None


def _reap(process) -> None:
    """Kill a run a failed assertion left going, so no VM outlives its test."""
    if process.poll() is None:
        process.kill()
        process.communicate()


def test_kernel_prints_its_banner_on_the_uart(debian_kernel, tmp_path, no_leaks):
    console = tmp_path / "console.log"
    process = subprocess.Popen(
        [*MPVMM, "start", "--kernel", debian_kernel, "--cpus", "2", "--memory", "256M",
         "--console", str(console), "--no-metrics",
         "--cmdline", "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off i8042.noaux"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seconds = _wait_for(console, COMMAND_LINE, process, BANNER_BOUND_SECONDS)
        assert seconds is not None, f"no banner within {BANNER_BOUND_SECONDS} s: {console.read_bytes()[-2000:]!r}"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        _reap(process)
    text = console.read_bytes().decode(errors="replace")
    assert text.index("Linux version") < text.index(COMMAND_LINE.decode())
    assert process.returncode == 128 + signal.SIGTERM, err
    assert b"stopped by SIGTERM" in err
    # The summary names what ran: a kernel, not the built-in guest's default workload.
    assert b"2 vCPUs, native runner, a Linux kernel" in out and b"workload" not in out
    print(f"banner after {seconds:.1f} s")


@pytest.mark.slow
def test_full_boot_to_init_sees_every_cpu_and_powers_off(debian_kernel, busybox_initramfs, tmp_path, no_leaks):
    console = tmp_path / "console.log"
    started = time.monotonic()
    process = subprocess.run(
        [*MPVMM, "start", "--kernel", debian_kernel, "--initrd", busybox_initramfs, "--cpus", "2",
         "--memory", "512M", "--console", str(console), "--no-metrics",
         "--cmdline", "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=FULL_BOOT_BOUND_SECONDS)
    seconds = time.monotonic() - started
    text = console.read_bytes().decode(errors="replace")
    assert "smp: Brought up 1 node, 2 CPUs" in text, text[-3000:]
    assert "mpvmm-init: cpus=2" in text, text[-3000:]
    assert b"guest powered off" in process.stderr, process.stderr
    assert process.returncode == 0
    print(f"full boot to power-off in {seconds:.0f} s")


def test_terminal_is_restored_when_a_kernel_run_is_stopped(debian_kernel, tmp_path, no_leaks):
    """With a terminal on stdin the run puts it in raw mode; SIGTERM gives it back as it was."""
    import os
    import termios

    leader, follower = os.openpty()
    process = None
    try:
        before = termios.tcgetattr(follower)
        process = subprocess.Popen(
            [*MPVMM, "start", "--kernel", debian_kernel, "--cpus", "1", "--memory", "256M",
             "--console", str(tmp_path / "console.log"), "--no-metrics"],
            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while termios.tcgetattr(follower)[3] & termios.ICANON:  # raw mode on: the VM is up
            assert process.poll() is None and time.monotonic() < deadline, "never entered raw mode"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signal.SIGTERM, err
        assert termios.tcgetattr(follower) == before
    finally:
        if process is not None:
            _reap(process)
        os.close(leader)
        os.close(follower)


def test_kernel_run_serves_metrics_and_stops_on_sigterm(debian_kernel, tmp_path, no_leaks):
    """An AP waiting for its SIPI sits in KVM_RUN for good: nothing may wait on it
    (opening its stats fd did, and then the run could never stop)."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [*MPVMM, "start", "--kernel", debian_kernel, "--cpus", "2", "--memory", "256M",
         "--console", str(tmp_path / "console.log"), "--metrics-port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        text = ""
        while 'mpvmm_vcpu_exits_total{reason="io",vcpu="0"}' not in text:
            assert process.poll() is None and time.monotonic() < deadline, "no exits exported"
            time.sleep(0.5)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                text = ""
        assert 'workload="linux"' in text
        assert 'mpvmm_kvm_vcpu_exits_total{vcpu="1"}' in text  # the AP's KVM stats, while it waits
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        _reap(process)
    assert process.returncode == 128 + signal.SIGTERM, err
