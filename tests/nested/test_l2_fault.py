"""l2_run's fault requests (the nested soak's), run here on the host against a kernel booting on its KVM.

On these machines a kernel gets to its banner and early set-up on the
host's own /dev/kvm, time enough for each fault; the soak itself runs the
same requests inside an L1 (tests/linux/test_nested_soak.py). Other runs
may share this host, so the leftovers are checked for this run's only.
"""

import json
import signal
import sys

import pytest

from tests.nested import l2_run

CMDLINE = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off"


def _run(tmp_path, kernel: str, fault: dict, *extra: str) -> dict:
    report = tmp_path / "report.json"
    argv = [sys.executable, "-m", "mpvmm", "start", "--kernel", kernel, "--cpus", "2", "--memory", "256M",
            "--cmdline", CMDLINE, "--no-metrics", "--console", str(tmp_path / "console"), "--report", str(report),
            *extra]
    result = l2_run.run({"argv": argv, "bound": 120, "console": str(tmp_path / "console"),
                         "console_copy": str(tmp_path / "stdout"), "phases": {}, "fault": fault})
    result["report"] = json.loads(report.read_text())
    return result


@pytest.mark.parametrize("kind", ["SIGTERM", "kill-device-model", "stop-device-model"])
def test_a_fault_is_injected_in_the_running_vm_and_timed(tmp_path, debian_kernel, no_leaks, kind):
    result = _run(tmp_path, debian_kernel, {"kind": kind, "delay": 0.5, "pause": 0.1})
    fault = result["fault"]
    assert fault["vm_started"] is not None and fault["injected"] >= fault["vm_started"] + 0.5
    assert fault["injected"] <= fault["ended"] <= result["seconds"] + 0.01
    if kind == "kill-device-model":
        assert result["status"] == 1 and result["report"]["status"] == "device model died (killed by signal 9)"
    else:
        assert result["status"] == 128 + signal.SIGTERM, result["stderr"]
    if kind == "stop-device-model":
        assert fault["stopped"] == "T"
        assert "stopped (SIGSTOP" in result["report"]["not_collected"]["device_model"]
    # mpvmm's own command line names tmp_path; its device model and IPC names are no_leaks's to check.
    assert [line for line in result["leftovers"]["processes"] if str(tmp_path) in line] == []


def test_a_time_limit_is_timed_from_the_vms_start(tmp_path, debian_kernel, no_leaks):
    result = _run(tmp_path, debian_kernel, {"kind": "time-limit"}, "--seconds", "1")
    fault = result["fault"]
    assert result["status"] == 0 and result["report"]["status"] == "time limit reached"
    assert fault["injected"] is None and fault["ended"] >= fault["vm_started"] + 1


def test_no_fault_entry_adds_nothing(tmp_path):
    result = l2_run.run({"argv": [sys.executable, "-c", "print('hi')"], "bound": 30, "console": None,
                         "console_copy": str(tmp_path / "stdout")})
    assert result["status"] == 0 and "fault" not in result and "leftovers" not in result
    assert (tmp_path / "stdout").read_text() == "hi\n"
