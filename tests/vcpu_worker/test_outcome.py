"""How a vCPU's end is typed and told: every fatal exit gets words, not a number."""

import errno

import pytest

from mpvmm.kvm import bindings as kb
from mpvmm.vcpu_worker.outcome import (
    Exited, Fault, LoopCode, RunFailed, Stopped, WorkerFailed, describe_failure, from_loop, report_fields,
)

REGISTERS = {"rip": 0x100721, "rsp": 0x203FA8}


@pytest.fixture
def kvm_run():
    return kb.kvm_run()


def test_loop_codes_become_outcomes(kvm_run):
    assert from_loop(LoopCode.STOPPED, 0) == Stopped()
    assert from_loop(LoopCode.EXITED, 3) == Exited(3)
    assert from_loop(LoopCode.ERROR, errno.EFAULT, kvm_run, lambda: REGISTERS) == RunFailed(errno.EFAULT, REGISTERS)
    assert from_loop(LoopCode.NONE, 0) == WorkerFailed("the run loop ended without an outcome")
    assert from_loop(9, 0) == WorkerFailed("the run loop ended with an unknown outcome 9")


def test_registers_are_read_only_for_a_failure(kvm_run):
    reads = []

    def read():
        reads.append(1)
        return REGISTERS

    from_loop(LoopCode.EXITED, 0, kvm_run, read)
    from_loop(LoopCode.STOPPED, 0, kvm_run, read)
    assert reads == []
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_SHUTDOWN, kvm_run, read).registers == REGISTERS
    assert reads == [1]


def test_fault_details_come_from_kvm_run(kvm_run):
    kvm_run.fail_entry.hardware_entry_failure_reason = 0x80000021  # invalid guest state
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_FAIL_ENTRY, kvm_run) == Fault(kb.KVM_EXIT_FAIL_ENTRY,
                                                                                hardware_reason=0x80000021)
    run = kb.kvm_run()
    run.internal.suberror = kb.KVM_INTERNAL_ERROR_EMULATION
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_INTERNAL_ERROR, run).suberror == kb.KVM_INTERNAL_ERROR_EMULATION
    run = kb.kvm_run()
    run.system_event.type = kb.KVM_SYSTEM_EVENT_RESET
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_SYSTEM_EVENT, run).system_event == kb.KVM_SYSTEM_EVENT_RESET
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_HLT, run) == Fault(kb.KVM_EXIT_HLT)


def test_a_worker_process_fault_has_no_details():
    assert from_loop(LoopCode.FAULT, kb.KVM_EXIT_FAIL_ENTRY) == Fault(kb.KVM_EXIT_FAIL_ENTRY)
    assert describe_failure(2, Fault(kb.KVM_EXIT_FAIL_ENTRY)) == "vcpu 2 stopped: VM entry failed"


@pytest.mark.parametrize("outcome, line", [
    (Fault(kb.KVM_EXIT_SHUTDOWN), "vcpu 1 stopped: triple fault (KVM_EXIT_SHUTDOWN)"),
    (Fault(kb.KVM_EXIT_FAIL_ENTRY, hardware_reason=0x80000021),
     "vcpu 1 stopped: VM entry failed (hardware reason 0x80000021)"),
    (Fault(kb.KVM_EXIT_INTERNAL_ERROR, suberror=kb.KVM_INTERNAL_ERROR_EMULATION),
     f"vcpu 1 stopped: KVM internal error (suberror {kb.KVM_INTERNAL_ERROR_EMULATION})"),
    (Fault(kb.KVM_EXIT_HLT), "vcpu 1 stopped: unexpected exit reason hlt (5)"),
    (Fault(63), "vcpu 1 stopped: unexpected exit reason 63 (63)"),
    (RunFailed(errno.EFAULT), "vcpu 1 stopped: KVM_RUN failed: Bad address (errno 14)"),
    (WorkerFailed("worker process 77 of vcpu 1 was killed by SIGKILL"),
     "vcpu 1: worker failed: worker process 77 of vcpu 1 was killed by SIGKILL"),
])
def test_failures_are_described(outcome, line):
    assert describe_failure(1, outcome) == line


@pytest.mark.parametrize("outcome, fields", [
    (Stopped(), ("stopped", 0)),
    (Exited(3), ("exited", 3)),
    (Fault(kb.KVM_EXIT_SHUTDOWN), ("fault: shutdown", kb.KVM_EXIT_SHUTDOWN)),
    (RunFailed(errno.EFAULT), ("error", errno.EFAULT)),
    (WorkerFailed("gone"), ("error", 0)),
])
def test_report_fields(outcome, fields):
    assert report_fields(outcome) == fields
