"""``mpvmm ctl`` as a user runs it: JSON out, one line and exit 1 for an error, exit 2 for bad usage."""

import json

from tests.vm_process import MPVMM, VmProcess, ctl

import subprocess


def test_status_pause_resume_stop(tmp_path, no_leaks):
    vm = VmProcess(tmp_path, "vm", "--cpus", "2", "--workload", "demo")
    vm.wait_running()
    status = ctl(vm.api_path, "status")
    assert status.returncode == 0
    body = json.loads(status.stdout)
    assert body["state"] == "running" and body["cpus"] == 2 and len(body["vcpus"]) == 2
    assert json.loads(ctl(vm.api_path, "pause").stdout) == {"state": "paused"}
    again = ctl(vm.api_path, "pause")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == "mpvmm: error: cannot pause a VM that is paused (HTTP 409)\n"
    assert ctl(vm.api_path, "resume").returncode == 0
    assert ctl(vm.api_path, "stop").returncode == 0
    assert vm.finish() == 0 and "stopped through the API; exit code 0" in vm.stderr


def test_no_vmm_is_one_line_and_exit_1(tmp_path):
    result = ctl(str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mpvmm: error: no API socket at {tmp_path / 'none.sock'}: is `mpvmm start --api-socket "
        f"{tmp_path / 'none.sock'}` running?"]


def test_bad_usage_is_exit_2(tmp_path):
    for args in (["status"], ["--api-socket", "x", "jump"], ["--api-socket", "x", "snapshot"],
                 ["--api-socket", "x", "migrate", "tcp:h:1", "--downtime-ms", "soon"]):
        result = subprocess.run([*MPVMM, "ctl", *args], capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
