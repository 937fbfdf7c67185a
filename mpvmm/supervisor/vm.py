"""The KVM side of a VM: the VM fd, its interrupt controller, memory slots and vCPUs.

What a vCPU starts as (CPUID, registers, run state) is the guest's to set
(guest.py), so the same VM serves every guest kind. A paused VM's KVM state
can be read and written whole (snapshots and migration), and its memory
slots can log the pages the guest writes (migration/dirty_log.py).
"""

import ctypes
import os
from collections.abc import Iterable, Mapping, Sequence

from mpvmm.kvm import bindings as kb
from mpvmm.snapshot.kvm_state import VcpuState, VmState
from mpvmm.vcpu_worker.route_table import SPACE_PIO
from mpvmm.x86 import layout


class VirtualMachine:
    """A KVM VM with an in-kernel irqchip and PIT, guest RAM and the vCPUs ``vcpu_ids``."""

    vm = None

    def __init__(self, kvm, memory, vcpu_ids: Iterable[int]):
        self.vcpus = []
        self._irq_fds: list[int] = []
        self._memory = memory
        self._dirty_logging = False
        self.vm = kvm.create_vm()
        try:
            self._msr_indices = kvm.msr_index_list()
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

    # --- State, for snapshots and migration. ---

    def _xsave_size(self) -> int:
        return self.vm.check_extension(kb.KVM_CAP_XSAVE2) or ctypes.sizeof(kb.kvm_xsave)

    def capture_state(self) -> tuple[list[VcpuState], VmState]:
        """Every vCPU's state (paused, none with an exit pending), then the VM's chips and clock."""
        size = self._xsave_size()
        vcpus = [VcpuState.capture(vcpu, self._msr_indices, size) for vcpu in self.vcpus]
        return vcpus, VmState.capture(self.vm)

    def restore_state(self, vcpus: Sequence[VcpuState], vm_state: VmState) -> None:
        """Write saved state into this VM's vCPUs (before they first run), then the VM's."""
        size = self._xsave_size()
        for vcpu, state in zip(self.vcpus, vcpus):
            state.restore(vcpu, size)
        vm_state.restore(self.vm)

    def log_dirty_pages(self, on: bool) -> None:
        """Have KVM log (or stop logging) every page the guest writes, slot by slot."""
        flags = kb.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for slot, (guest_address, size, offset) in enumerate(self._memory.regions()):
            self.vm.set_user_memory_region(slot, guest_address, size, self._memory.host_address + offset, flags)
        self._dirty_logging = on

    def dirty_bitmaps(self, buffers: Sequence) -> None:
        """Fill ``buffers[slot]`` (one bit per page) with the pages written since the last call."""
        for slot, buffer in enumerate(buffers):
            self.vm.get_dirty_log(slot, ctypes.addressof(buffer))

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
