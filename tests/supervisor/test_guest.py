"""The Guest and vCPU host choices: what each guest kind checks, sets up and ends the run with."""

import pytest

from mpvmm.errors import UsageError
from mpvmm.kvm import bindings as kb
from mpvmm.kvm.system import Kvm
from mpvmm.supervisor.builtin_guest import MAX_CPUS, BuiltinGuestSource, stack_top
from mpvmm.supervisor.ending import GuestEvent
from mpvmm.supervisor.linux_guest import LinuxBoot, LinuxGuest
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.supervisor.run import RunConfig, choose
from mpvmm.supervisor.vcpu_host import RUNNERS, NativeThreads, ProcessPerVcpu, PythonThreads
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.vcpu_worker.outcome import Exited, Fault, Stopped
from mpvmm.x86 import layout, linux
from tests.x86.bzimage_fixtures import compress, make_bzimage, tiny_elf


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(compress(tiny_elf(), "gzip")))
    return str(path)


def test_choose_picks_the_builtin_guest_and_the_runner():
    source, host = choose(RunConfig(cpus=2, memory=64 << 20, runner="python"))
    assert isinstance(source, BuiltinGuestSource) and host is PythonThreads
    assert source.workload == "demo" and source.machine.irq_lines == {}


def test_choose_picks_linux_with_its_pc_machine(kernel):
    source, host = choose(RunConfig(cpus=2, memory=64 << 20, kernel=kernel))
    assert isinstance(source, LinuxBoot) and host is NativeThreads
    assert source.workload == "linux"
    assert source.machine.name == "pc" and source.machine.host_input
    assert source.machine.irq_lines == {"com1": layout.COM1_IRQ, "i8042": layout.I8042_IRQ,
                                       "rtc": layout.RTC_IRQ}


def test_a_runner_without_a_shared_irqchip_cannot_boot_linux(kernel):
    assert not ProcessPerVcpu.shares_interrupt_controller
    assert all(RUNNERS[name].shares_interrupt_controller for name in ("native", "python"))
    with pytest.raises(UsageError, match="--runner process has no shared interrupt controller"):
        choose(RunConfig(memory=64 << 20, runner="process", kernel=kernel))


def test_initrd_and_cmdline_need_a_kernel():
    with pytest.raises(UsageError, match="need --kernel"):
        choose(RunConfig(cmdline="quiet"))


@pytest.mark.parametrize("cpus, workload, memory, message", [
    (1, "nope", 64 << 20, "unknown workload 'nope'"),
    (MAX_CPUS + 1, "demo", 1 << 30, f"at most {MAX_CPUS} vCPUs"),
    (4, "demo", 1 << 20, "too small for the guest with 4 vCPUs"),
])
def test_builtin_guest_refuses_what_cannot_run(cpus, workload, memory, message):
    with pytest.raises(UsageError, match=message):
        BuiltinGuestSource(cpus, workload, memory)


def test_builtin_guest_enters_each_vcpu_at_cpl3(kvm_available):
    """Whatever VM a vCPU is in (a worker process's has just its own), it starts as vCPU ``index``."""
    with Kvm() as kvm, GuestMemory(64 << 20) as memory:
        guest = BuiltinGuestSource(4, "pio-null", memory.size).load(memory)
        with VirtualMachine(kvm, memory, [0, 3]) as vm:
            guest.set_up_vcpus(kvm, vm.vcpus)
            for vcpu in vm.vcpus:
                regs = vcpu.get_regs()
                assert (regs.rip, regs.rsp) == (guest.entry, stack_top(vcpu.index))
                assert (regs.rdi, regs.rsi) == (vcpu.index, layout.GUEST_PARAMS_ADDR)
                assert vcpu.get_sregs().cs.dpl == 3
                assert vcpu.get_mp_state() == kb.KVM_MP_STATE_RUNNABLE


def test_linux_guest_starts_the_bsp_and_leaves_the_aps_to_sipi(kernel, kvm_available):
    with Kvm() as kvm, GuestMemory(64 << 20) as memory:
        guest = LinuxBoot.from_files(kernel, None, None, 2, memory.size).load(memory)
        with VirtualMachine(kvm, memory, range(2)) as vm:
            guest.set_up_vcpus(kvm, vm.vcpus)
            bsp, ap = vm.vcpus
            assert bsp.get_regs().rip == guest.entry == 0x1000000  # the tiny ELF's entry
            assert bsp.get_regs().rsi == layout.LINUX_ZERO_PAGE_ADDR
            assert bsp.get_sregs().cs.selector == linux.BOOT_CS_INDEX * 8
            assert bsp.get_mp_state() == kb.KVM_MP_STATE_RUNNABLE
            assert ap.get_mp_state() == kb.KVM_MP_STATE_UNINITIALIZED


@pytest.mark.parametrize("outcome, event", [
    (Fault(kb.KVM_EXIT_SHUTDOWN), GuestEvent.TRIPLE_FAULT),
    (Fault(kb.KVM_EXIT_SYSTEM_EVENT, system_event=kb.KVM_SYSTEM_EVENT_SHUTDOWN), GuestEvent.POWER_OFF),
    (Fault(kb.KVM_EXIT_SYSTEM_EVENT, system_event=kb.KVM_SYSTEM_EVENT_RESET), GuestEvent.REBOOT),
    (Fault(kb.KVM_EXIT_SYSTEM_EVENT, system_event=kb.KVM_SYSTEM_EVENT_CRASH), GuestEvent.CRASH),
    (Fault(kb.KVM_EXIT_SYSTEM_EVENT, system_event=99), None),
    (Fault(kb.KVM_EXIT_FAIL_ENTRY), None),
    (Stopped(), None),
    (Exited(0), None),
])
def test_a_kernel_ends_the_run_by_a_reset_or_a_system_event(outcome, event):
    assert LinuxGuest(0x1000000, 2).ending(outcome) == event


def test_a_builtin_guest_fault_is_only_a_fault(kvm_available):
    with GuestMemory(64 << 20) as memory:
        guest = BuiltinGuestSource(1, "demo", memory.size).load(memory)
        assert guest.ending(Fault(kb.KVM_EXIT_SHUTDOWN)) is None
        assert guest.counts(0).ops["debug_exits"] == 0
        assert LinuxGuest(0, 1).counts(0) is None
