"""Run endings and vCPU outcomes into the exit code and status line a user sees."""

import errno
import signal

import pytest

from mpvmm.kvm import bindings as kb
from mpvmm.supervisor.ending import (
    DeviceModelDied, GuestEnded, GuestEvent, GuestExited, StopSignal, TimeLimit, UnknownGuestEvent, VcpuFailed,
    device_model_ending, exit_status, status_line,
)
from mpvmm.vcpu_worker.outcome import Exited, Fault, RunFailed, Stopped, WorkerFailed

REGISTERS = {"rip": 0x100721}


@pytest.mark.parametrize("ending, line", [
    (GuestExited(), "guest exited"),
    (TimeLimit(), "time limit reached"),
    (StopSignal(signal.SIGTERM), "stopped by SIGTERM"),
    (DeviceModelDied("killed by signal 9"), "device model died (killed by signal 9)"),
    (VcpuFailed(), "vcpu fault"),
    (GuestEnded(GuestEvent.POWER_OFF), "guest powered off"),
    (GuestEnded(GuestEvent.REBOOT), "guest rebooted"),
    (GuestEnded(GuestEvent.TRIPLE_FAULT, 0), "guest reset by a triple fault (vcpu 0)"),
    (GuestEnded(GuestEvent.CRASH, 1), "guest reported a crash (KVM_SYSTEM_EVENT_CRASH) (vcpu 1)"),
    (UnknownGuestEvent("sleep"), "guest event sleep"),
])
def test_status_lines(ending, line):
    assert status_line(ending) == line


def test_device_model_events():
    assert device_model_ending("poweroff") == GuestEnded(GuestEvent.POWER_OFF)
    assert device_model_ending("reboot") == GuestEnded(GuestEvent.REBOOT)
    assert device_model_ending("sleep") == UnknownGuestEvent("sleep")


def test_a_clean_run_is_zero():
    assert exit_status(TimeLimit(), [Exited(0), Stopped()]) == (0, "time limit reached", {})


def test_the_first_nonzero_guest_status_is_the_exit_code():
    code, status, _ = exit_status(GuestExited(), [Exited(0), Exited(3), Exited(4)])
    assert (code, status) == (3, "guest exited; vcpu 1 exited with status 3")
    assert exit_status(GuestExited(), [Exited(0x1FF)]).code == 0xFF


def test_a_stop_signal_is_128_plus_its_number():
    assert exit_status(StopSignal(signal.SIGINT), [Stopped(), Exited(3)]) == (130, "stopped by SIGINT", {})


def test_a_fault_names_the_vcpu_and_keeps_its_registers():
    code, status, registers = exit_status(VcpuFailed(), [Exited(0), Fault(kb.KVM_EXIT_SHUTDOWN, registers=REGISTERS)])
    assert (code, status) == (1, "vcpu 1 stopped: triple fault (KVM_EXIT_SHUTDOWN)")
    assert registers == {1: REGISTERS}


def test_a_failing_vcpu_outranks_a_signal_and_the_device_model():
    assert exit_status(StopSignal(signal.SIGTERM), [RunFailed(errno.EFAULT)]).code == 1
    assert exit_status(DeviceModelDied("exit status 1"), [WorkerFailed("killed")]) == \
        (1, "vcpu 0: worker failed: killed", {})
    assert exit_status(DeviceModelDied("killed by signal 9"), [Stopped(), Stopped()]) == \
        (1, "device model died (killed by signal 9)", {})


def test_a_guest_ending_decides_alone():
    """A kernel's triple fault is its reset: exit 1 with its own words, not the vCPU's fault."""
    shutdown = Fault(kb.KVM_EXIT_SHUTDOWN, registers=REGISTERS)
    assert exit_status(GuestEnded(GuestEvent.TRIPLE_FAULT, 0), [shutdown, Stopped()]) == \
        (1, "guest reset by a triple fault (vcpu 0)", {})
    assert exit_status(GuestEnded(GuestEvent.POWER_OFF), [Stopped(), Stopped()]).code == 0
    assert exit_status(GuestEnded(GuestEvent.REBOOT), [Stopped()]).code == 0
    assert exit_status(GuestEnded(GuestEvent.CRASH, 0), [Stopped()]).code == 1


def test_an_unknown_guest_event_ends_like_any_run():
    assert exit_status(UnknownGuestEvent("sleep"), [Stopped()]) == (0, "guest event sleep", {})
