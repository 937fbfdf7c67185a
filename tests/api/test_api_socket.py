"""The API socket's life: 0600, taken over when stale, refused when live, gone on every exit."""

import os
import signal
import socket
import stat
import time

import pytest

from tests.vm_process import VmProcess, ctl


def wait_gone(path, process, timeout=30):
    deadline = time.monotonic() + timeout
    code = process.finish(timeout)
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_removed_when_a_signal_stops_the_run(signum, tmp_path, no_leaks):
    vm = VmProcess(tmp_path, "vm", "--workload", "demo")
    vm.wait_running()
    assert stat.S_IMODE(os.stat(vm.api_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(vm.api_path).st_mode)
    os.kill(vm.pid, signum)
    assert wait_gone(vm.api_path, vm) == 128 + signum
    assert not os.path.exists(vm.api_path)


def test_removed_when_a_vcpu_faults(tmp_path, no_leaks):
    vm = VmProcess(tmp_path, "vm", "--workload", "triple-fault")
    vm.wait_for(vm.api_path)
    assert wait_gone(vm.api_path, vm) == 1
    assert "vcpu 0" in vm.stderr and not os.path.exists(vm.api_path)


def test_removed_when_the_device_model_dies(tmp_path, no_leaks):
    vm = VmProcess(tmp_path, "vm", "--workload", "pio-device")
    vm.wait_running()
    children = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == vm.pid]
    device_model = [pid for pid in children if b"mpvmm.devicemodel" in open(f"/proc/{pid}/cmdline", "rb").read()]
    os.kill(device_model[0], signal.SIGKILL)
    assert wait_gone(vm.api_path, vm) == 1
    assert "device model died" in vm.stderr and not os.path.exists(vm.api_path)


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def test_a_stale_socket_is_taken_over_and_a_live_one_refused(tmp_path, no_leaks):
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a SIGKILLed VMM leaves
    stale.close()
    first = VmProcess(tmp_path, "vm", "--workload", "demo")
    first.wait_running()
    second = VmProcess(tmp_path, "vm", "--workload", "demo")
    assert second.finish() == 2
    assert f"--api-socket {path}: already in use" in second.stderr
    assert ctl(first.api_path, "stop").returncode == 0
    assert first.finish() == 0 and not path.exists()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path, no_leaks):
    (tmp_path / "vm.sock").write_text("mine")
    vm = VmProcess(tmp_path, "vm", "--workload", "demo")
    assert vm.finish() == 2 and "already in use" in vm.stderr
    assert (tmp_path / "vm.sock").read_text() == "mine"
