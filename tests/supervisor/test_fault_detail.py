"""How a stopped vCPU is described: every fatal exit gets words, not a number."""

import errno
from types import SimpleNamespace

import pytest

from mpvmm.kvm import bindings as kb
from mpvmm.supervisor.builtin_guest import GuestCounts
from mpvmm.supervisor.run import RunConfig, Supervisor, VcpuResult


def vcpu_result(outcome, value):
    return VcpuResult(index=0, outcome=outcome, outcome_value=value, exits={}, paths={}, runs=0,
                      interrupted=0, sync_latency_buckets=[], sync_latency_sum_seconds=0.0,
                      sleep_seconds=0.0, posted_stalls=0,
                      guest=GuestCounts(0, 0, {}, 0, 0), pid=1, cpu_seconds=None)


@pytest.fixture
def kvm_run():
    return kb.kvm_run()


def detail(kvm_run, outcome, value):
    worker = SimpleNamespace(vcpu=SimpleNamespace(kvm_run=kvm_run))
    return Supervisor(RunConfig())._fault_detail(worker, vcpu_result(outcome, value))


def test_triple_fault(kvm_run):
    assert detail(kvm_run, "fault: shutdown", kb.KVM_EXIT_SHUTDOWN) == "stopped: triple fault (KVM_EXIT_SHUTDOWN)"


def test_entry_failure_names_the_hardware_reason(kvm_run):
    kvm_run.fail_entry.hardware_entry_failure_reason = 0x80000021  # invalid guest state
    assert detail(kvm_run, "fault: fail_entry", kb.KVM_EXIT_FAIL_ENTRY) == \
        "stopped: VM entry failed (hardware reason 0x80000021)"


def test_internal_error_names_the_suberror(kvm_run):
    kvm_run.internal.suberror = kb.KVM_INTERNAL_ERROR_EMULATION
    assert detail(kvm_run, "fault: internal_error", kb.KVM_EXIT_INTERNAL_ERROR) == \
        f"stopped: KVM internal error (suberror {kb.KVM_INTERNAL_ERROR_EMULATION})"


def test_unexpected_exit_reason_is_named(kvm_run):
    assert detail(kvm_run, "fault: hlt", kb.KVM_EXIT_HLT) == "stopped: unexpected exit reason hlt (5)"


def test_a_failed_kvm_run_names_the_errno(kvm_run):
    assert detail(kvm_run, "error", errno.EFAULT) == "stopped: KVM_RUN failed: Bad address (errno 14)"


def test_a_worker_process_has_no_kvm_run_to_read():
    worker = SimpleNamespace(pid=1234)
    assert Supervisor(RunConfig())._fault_detail(worker, vcpu_result("fault", kb.KVM_EXIT_FAIL_ENTRY)) == \
        "stopped: VM entry failed"
