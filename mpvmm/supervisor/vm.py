"""The KVM side of a VM: the VM fd, its interrupt controller, memory slots and vCPUs."""

from mpvmm.kvm import bindings as kb
from mpvmm.x86 import layout, usermode
from mpvmm.x86.cpuid import vcpu_cpuid


class VirtualMachine:
    """A KVM VM with an in-kernel irqchip and PIT, guest RAM and ``cpus`` vCPUs."""

    vm = None

    def __init__(self, kvm, memory, cpus: int):
        self.vcpus = []
        self.memory = memory
        self.vm = kvm.create_vm()
        try:
            # VMX needs these two regions before the first vCPU exists.
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)
            for slot, (guest_address, size, offset) in enumerate(memory.regions()):
                self.vm.set_user_memory_region(slot, guest_address, size, memory.host_address + offset)
            supported = kvm.supported_cpuid()
            for index in range(cpus):
                vcpu = self.vm.create_vcpu(index)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid2(vcpu_cpuid(supported, index, cpus))
        except BaseException:
            self.close()
            raise

    def enter_user_mode(self, index: int, entry: int, stack_top: int, *arguments: int) -> None:
        """Start vCPU ``index`` at ``entry`` in 64-bit CPL 3, runnable at once.

        Application processors are made runnable directly (no INIT/SIPI):
        the built-in guest has no ring-0 code to bring them up itself.
        """
        vcpu = self.vcpus[index]
        sregs = vcpu.get_sregs()
        usermode.set_user_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(usermode.user_mode_regs(entry, stack_top, *arguments))
        vcpu.set_mp_state(kb.KVM_MP_STATE_RUNNABLE)

    def registers(self, index: int) -> dict[str, int]:
        """The general registers of a stopped vCPU, for fault reports."""
        regs = self.vcpus[index].get_regs()
        return {name: getattr(regs, name) for name, _ in type(regs)._fields_}

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
