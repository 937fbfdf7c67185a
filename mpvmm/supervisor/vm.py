"""The KVM side of a VM: the VM fd, its interrupt controller, memory slots and vCPUs.

What a vCPU starts as (CPUID, registers, run state) is the guest's to set
(guest.py), so the same VM serves every guest kind.
"""

import os
from collections.abc import Iterable, Mapping

from mpvmm.kvm import bindings as kb
from mpvmm.vcpu_worker.route_table import SPACE_PIO
from mpvmm.x86 import layout


class VirtualMachine:
    """A KVM VM with an in-kernel irqchip and PIT, guest RAM and the vCPUs ``vcpu_ids``."""

    vm = None

    def __init__(self, kvm, memory, vcpu_ids: Iterable[int]):
        self.vcpus = []
        self._irq_fds: list[int] = []
        self.vm = kvm.create_vm()
        try:
            # VMX needs these two regions before the first vCPU exists.
            self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
            self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)
            for slot, (guest_address, size, offset) in enumerate(memory.regions()):
                self.vm.set_user_memory_region(slot, guest_address, size, memory.host_address + offset)
            for index in vcpu_ids:
                self.vcpus.append(self.vm.create_vcpu(index))
        except BaseException:
            self.close()
            raise

    def connect_irq_lines(self, lines: Mapping[str, int]) -> dict[str, int]:
        """An eventfd per line (name -> GSI) that raises its GSI when written; closed with the VM.

        The device model gets the eventfds: it cannot call VM ioctls itself
        (docs/design.md, "The address-space rule"), but it can write an eventfd.
        """
        fds = {}
        for name, gsi in lines.items():
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._irq_fds.append(fd)
            self.vm.irqfd(fd, gsi)
            fds[name] = fd
        return fds

    def coalesce(self, route) -> None:
        """Have KVM append writes to ``route`` (a RouteTable Route) to its coalesced ring."""
        self.vm.register_coalesced_mmio(route.base, route.length, pio=route.space == SPACE_PIO)

    def add_doorbell(self, fd: int, route) -> None:
        """Have KVM signal eventfd ``fd`` on writes to ``route`` (matching its datamatch, if any)."""
        self.vm.ioeventfd(fd, route.base, route.length, datamatch=route.datamatch, pio=route.space == SPACE_PIO)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for fd in self._irq_fds:
            os.close(fd)
        self._irq_fds = []

    def __enter__(self) -> "VirtualMachine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
