"""The nested-KVM harness itself: each layer's hang or failure is named, no QEMU outlives us.

These start real QEMUs; the cheap ones never boot L1 fully (a bound of a
second, or a fake QEMU). One L1 is booted for the command and L2 bounds.
"""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.linux.initramfs import write_initramfs
from tests.nested.l1 import L1, REPO, Assets, Bounds, LayerError
from tests.nested.l2 import NestedLinux

pytestmark = pytest.mark.nested_kvm


@pytest.fixture(scope="module")
def assets(test_cache):
    return Assets.from_cache(test_cache)


def _gone(pid: int) -> bool:
    """No such process, or only its zombie is left for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def _fake_qemu(tmp_path, body: str) -> str:
    """A stand-in for qemu-system-x86_64 that records its pid and then does ``body``."""
    path = tmp_path / "fake-qemu"
    path.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/fake-qemu.pid\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_qemu_that_never_boots_is_the_qemu_start_layer_and_is_killed(assets, tmp_path):
    l1 = L1(assets, str(tmp_path), bounds=Bounds(qemu_start=2), qemu=_fake_qemu(tmp_path, "exec sleep 600"))
    with pytest.raises(LayerError) as failure:
        l1.start()
    assert failure.value.layer == "QEMU start" and "within 2 s" in str(failure.value)
    assert _wait_gone(int((tmp_path / "fake-qemu.pid").read_text()))


def test_a_qemu_that_exits_is_reported_with_its_output(assets, tmp_path):
    l1 = L1(assets, str(tmp_path), qemu=_fake_qemu(tmp_path, "echo 'no such machine' >&2; exit 3"))
    with pytest.raises(LayerError) as failure:
        l1.start()
    assert failure.value.layer == "QEMU start"
    assert "status 3" in str(failure.value) and "no such machine" in str(failure.value)


def test_a_missing_qemu_is_one_clear_error(assets, tmp_path):
    l1 = L1(assets, str(tmp_path), qemu=str(tmp_path / "no-such-qemu"))
    with pytest.raises(LayerError, match="cannot run"):
        l1.start()


def test_an_l1_kernel_slower_than_its_bound_is_the_l1_boot_layer(assets, tmp_path):
    l1 = L1(assets, str(tmp_path), bounds=Bounds(l1_boot=0.5))
    with pytest.raises(LayerError) as failure:
        l1.start()
    assert failure.value.layer == "L1 boot" and "nested-l1: init" in str(failure.value)
    assert _wait_gone(l1.process.pid)


def test_a_module_that_does_not_load_is_the_modules_layer(assets, tmp_path):
    """kvm-amd before kvm: insmod fails on the missing symbols, init says so and powers off."""
    l1 = L1(assets, str(tmp_path), modules=["arch/x86/kvm/kvm-amd.ko"])
    with pytest.raises(LayerError) as failure:
        l1.start()
    assert failure.value.layer == "L1 modules" and "insmod arch/x86/kvm/kvm-amd.ko failed" in str(failure.value)
    assert _wait_gone(l1.process.pid)


def test_a_failed_start_is_tried_twice_then_not_again_by_every_command(assets, tmp_path):
    """An L1 boot failure gets one retry (TCG hiccups pass); then the failure is remembered."""
    l1 = L1(assets, str(tmp_path), bounds=Bounds(l1_boot=0.5))
    with pytest.raises(LayerError, match="L1 boot"):
        l1.run("true", timeout=10)
    assert len(l1.retried_starts) == 1 and "nested-l1: init" in l1.retried_starts[0]
    started = time.monotonic()
    with pytest.raises(LayerError, match="an earlier start"):
        l1.run("true", timeout=10)
    assert time.monotonic() - started < 1
    assert _wait_gone(l1.process.pid)


@pytest.fixture(scope="module")
def l1(assets, tmp_path_factory):
    machine = L1(assets, str(tmp_path_factory.mktemp("harness-l1")))
    try:
        yield machine
    finally:
        machine.close()
    assert _wait_gone(machine.process.pid)


def test_a_command_runs_in_the_hosts_root_with_kvm(l1):
    result = l1.run("test -c /dev/kvm && test -f pyproject.toml && grep -c ^ /proc/cpuinfo >/dev/null; "
                    "echo out; echo err >&2; exit 7", timeout=120)
    assert (result.status, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert l1.boot_seconds["L1 mounts"] < Bounds().qemu_start + Bounds().l1_boot
    assert l1.run("pwd", timeout=60).stdout.strip() == REPO


def test_a_command_that_hangs_is_the_command_layer_and_l1_is_replaced(l1):
    first_qemu = l1.process.pid
    with pytest.raises(LayerError) as failure:
        l1.run("echo started; sleep 600", timeout=5)
    assert failure.value.layer == "command" and "within 5 s" in str(failure.value)
    assert "started" in str(failure.value)  # its output so far
    assert _wait_gone(first_qemu)
    assert l1.run("echo fresh", timeout=300).stdout == "fresh\n"  # a new L1
    assert l1.process.pid != first_qemu


def test_an_l2_that_outlives_its_bound_is_the_l2_layer_and_is_killed(l1, test_cache, tmp_path):
    (kernel,) = glob.glob(os.path.join(test_cache, "x-kernel", "boot", "vmlinuz-*"))
    initrd = write_initramfs(os.path.join(test_cache, "x-busybox", "bin", "busybox"), str(tmp_path / "init.cpio.gz"))
    nested = NestedLinux(l1)
    with pytest.raises(LayerError) as failure:
        nested.boot(kernel, initrd, 1, cmdline="console=ttyS0", bound=3)
    assert failure.value.layer == "L2" and "within 3 s" in str(failure.value)
    left = l1.run("pgrep -f 'mpvmm start' || true", timeout=120)
    assert left.stdout == "", f"mpvmm processes left in L1: {left.stdout}"


def test_qemu_dies_with_the_test_process_even_by_sigkill(test_cache, tmp_path):
    """PR_SET_PDEATHSIG: no Python cleanup runs after SIGKILL, the kernel still kills QEMU."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {REPO!r})
        from tests.nested.l1 import L1, Assets
        l1 = L1(Assets.from_cache({test_cache!r}), {str(tmp_path)!r})
        l1.start()
        print(l1.process.pid, flush=True)
        time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        qemu_pid = int(runner.stdout.readline())
        assert not _gone(qemu_pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        assert _wait_gone(qemu_pid), "QEMU outlived the process that started it"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert os.path.exists(tmp_path / "l1-console.log")
