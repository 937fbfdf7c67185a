"""A vCPU's and a VM's KVM state: captured from a paused guest, written into a new VM, read back equal."""

import ctypes
import dataclasses
import errno
import os
import time

import pytest

from mpvmm.errors import KvmIoctlError, StateError
from mpvmm.kvm import bindings as kb
from mpvmm.kvm.system import Kvm
from mpvmm.snapshot.kvm_state import VcpuState, VmState
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.supervisor.vm import VirtualMachine

MSR_IA32_TSC = 0x10  # moves with time: read back a little later than written


def captured(workload="pio-device", cpus=2):
    """(vCPU states, VM state) of a built-in guest paused mid-run."""
    seen = {}

    def capture(vm):
        time.sleep(0.3)
        vm.vcpus.pause()
        assert vm.vcpus.wait_paused(5)
        seen["state"] = vm.host.machine.capture_state()
        vm.vcpus.resume()

    config = RunConfig(cpus=cpus, memory=64 << 20, workload=workload, seconds=0.6)
    assert Supervisor(config, on_started=capture).run().exit_code == 0
    return seen["state"]


def test_a_state_written_into_a_new_vm_reads_back_the_same(no_leaks):
    vcpus, vm_state = captured()
    assert vcpus[0].regs != vcpus[1].regs  # two vCPUs, each mid-workload
    assert len(vcpus[0].msrs) > 10 and len(vcpus[0].cpuid) > 0
    with Kvm() as kvm, GuestMemory(64 << 20) as memory, VirtualMachine(kvm, memory, range(2)) as vm:
        vm.restore_state(vcpus, vm_state)
        again, vm_again = vm.capture_state()
    for before, after in zip(vcpus, again):
        for field in ("cpuid", "mp_state", "regs", "sregs", "xsave", "xcrs", "debugregs", "lapic"):
            assert getattr(after, field) == getattr(before, field), field
        assert {i: v for i, v in after.msrs if i != MSR_IA32_TSC} == {i: v for i, v in before.msrs if i != MSR_IA32_TSC}
        tsc_before, tsc_after = dict(before.msrs)[MSR_IA32_TSC], dict(after.msrs)[MSR_IA32_TSC]
        assert tsc_before <= tsc_after  # it went on from the saved value, not from the new VM's zero
    assert vm_again.irqchips == vm_state.irqchips
    saved_clock = kb.kvm_clock_data.from_buffer_copy(vm_state.clock).clock
    assert kb.kvm_clock_data.from_buffer_copy(vm_again.clock).clock >= saved_clock


class WithoutXsave:
    """A real vCPU whose KVM answers KVM_SET_XCRS as on a host without XSAVE (QEMU's qemu64 CPU,
    the nested tests' L1): EINVAL, whatever the XCRs, none included."""

    def __init__(self, vcpu):
        self._vcpu = vcpu

    def __getattr__(self, name):
        return getattr(self._vcpu, name)

    def set_xcrs(self, xcrs):
        raise KvmIoctlError("KVM_SET_XCRS", errno.EINVAL, os.strerror(errno.EINVAL))


def test_a_state_saved_without_xcrs_restores_on_a_host_without_xsave(no_leaks):
    """KVM_GET_XCRS there gives no XCRs; the restore must not write them back."""
    vcpus, _vm_state = captured(workload="demo", cpus=1)
    saved = dataclasses.replace(vcpus[0], xcrs=bytes(ctypes.sizeof(kb.kvm_xcrs)))
    with Kvm() as kvm, GuestMemory(64 << 20) as memory, VirtualMachine(kvm, memory, range(1)) as vm:
        saved.restore(WithoutXsave(vm.vcpus[0]), vm._xsave_size())
        assert bytes(vm.vcpus[0].get_regs()) == saved.regs
        with pytest.raises(StateError, match="KVM_SET_XCRS"):  # XCRs saved there are refused, clearly
            vcpus[0].restore(WithoutXsave(vm.vcpus[0]), vm._xsave_size())


def test_records_round_trip():
    vcpus, vm_state = captured(workload="demo", cpus=1)
    assert VcpuState.from_record(vcpus[0].to_record()) == vcpus[0]
    assert VmState.from_record(vm_state.to_record()) == vm_state


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("regs"), "lacks 'regs'"),
    (lambda r: r.update(regs=b"\0" * 10), "10 bytes where 144"),
    (lambda r: r.update(msrs=[[1, 2, 3]]), "MSRs are not a list"),
    (lambda r: r.update(msrs=[[-1, 0]]), "MSR index"),
    (lambda r: r.update(xsave=b"\0" * 100), "XSAVE image"),
    (lambda r: r.update(cpuid=b"\0" * 41), "whole number of entries"),
    (lambda r: r.update(index=True), "vcpu index"),
])
def test_a_bad_vcpu_record_is_refused(change, message):
    record = {"index": 0, "cpuid": b"", "mp_state": 0, "regs": bytes(144),
              "sregs": bytes(ctypes.sizeof(kb.kvm_sregs)), "xsave": bytes(4096),
              "xcrs": bytes(ctypes.sizeof(kb.kvm_xcrs)), "debugregs": bytes(ctypes.sizeof(kb.kvm_debugregs)),
              "lapic": bytes(1024), "msrs": [[0x10, 5]], "events": bytes(ctypes.sizeof(kb.kvm_vcpu_events))}
    VcpuState.from_record(dict(record))
    change(record)
    with pytest.raises(StateError, match=message):
        VcpuState.from_record(record)


def test_a_bad_vm_record_is_refused():
    with pytest.raises(StateError, match="2 irqchips, not 3"):
        VmState.from_record({"irqchips": [bytes(520)] * 2, "pit": b"", "clock": b""})
    with pytest.raises(StateError, match="PIT"):
        VmState.from_record({"irqchips": [bytes(520)] * 3, "pit": b"x", "clock": bytes(48)})
