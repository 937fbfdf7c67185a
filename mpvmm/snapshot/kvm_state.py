"""What KVM holds of a VM, read and written through its ioctls: each vCPU's state and the VM's.

A vCPU's state is what Firecracker and QEMU save: CPUID, MP state, general
and special registers, the XSAVE image (FPU, SSE, AVX ...), XCRs, debug
registers, the local APIC's register page, every MSR KVM lists as saveable
(KVM_GET_MSR_INDEX_LIST) and the pending events. The VM's is the in-kernel
irqchip (both i8259s and the IOAPIC), the PIT and the kvmclock. Each
structure is kept as the bytes of its ``linux/kvm.h`` mirror, so a record
is exactly what the kernel gave and takes.

Order matters (Firecracker's ``vstate/vcpu.rs`` says why): the MP state is
read first, since reading it makes KVM accept pending APIC events, and the
vCPU events last; on restore CPUID comes first, the events last. The vCPUs
must be paused with no exit pending (the run loops see to that) and are
restored before the VM's chips, as Firecracker does.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from mpvmm.errors import KvmError, StateError
from mpvmm.kvm import bindings as kb

_CPUID_ENTRY_SIZE = ctypes.sizeof(kb.kvm_cpuid_entry2)
# KVM_SET_VCPU_EVENTS ignores the NMI-pending and SIPI fields unless these
# are set, and KVM_GET_VCPU_EVENTS does not set them: QEMU adds them too.
_EVENTS_RESTORE_FLAGS = kb.KVM_VCPUEVENT_VALID_NMI_PENDING | kb.KVM_VCPUEVENT_VALID_SIPI_VECTOR
_IRQCHIPS = (kb.KVM_IRQCHIP_PIC_MASTER, kb.KVM_IRQCHIP_PIC_SLAVE, kb.KVM_IRQCHIP_IOAPIC)


def _load(ctype: type, data: object, what: str):
    """``ctype`` rebuilt from the bytes of a record; refuses bytes of the wrong size."""
    if not isinstance(data, bytes) or len(data) != ctypes.sizeof(ctype):
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise StateError(f"{what}: {size} bytes where {ctypes.sizeof(ctype)} were expected")
    return ctype.from_buffer_copy(data)


def _uint(value: object, what: str, bits: int = 64) -> int:
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise StateError(f"{what}: {value!r:.40} is not a {bits}-bit unsigned integer")
    return value


def read_msrs(vcpu, indices: list[int]) -> list[tuple[int, int]]:
    """(index, value) of every MSR in ``indices`` KVM will read; one it refuses is left out."""
    values: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        read = vcpu.get_msrs(rest, strict=False)
        values += read.items()
        rest = rest[len(read) + 1:]  # skip the one KVM stopped at
    return values


@dataclass(frozen=True)
class VcpuState:
    """One vCPU as KVM holds it; every structure as its bytes."""

    index: int
    cpuid: bytes  # kvm_cpuid_entry2 after kvm_cpuid_entry2
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    msrs: tuple[tuple[int, int], ...]
    events: bytes

    @classmethod
    def capture(cls, vcpu, msr_indices: list[int], xsave_size: int) -> "VcpuState":
        """Read ``vcpu`` (paused, no exit pending) in the order KVM needs."""
        mp_state = vcpu.get_mp_state()
        return cls(
            index=vcpu.index,
            cpuid=b"".join(bytes(entry) for entry in vcpu.get_cpuid2()),
            mp_state=mp_state,
            regs=bytes(vcpu.get_regs()),
            sregs=bytes(vcpu.get_sregs()),
            xsave=bytes(vcpu.get_xsave(xsave_size)),
            xcrs=bytes(vcpu.get_xcrs()),
            debugregs=bytes(vcpu.get_debugregs()),
            lapic=bytes(vcpu.get_lapic()),
            msrs=tuple(read_msrs(vcpu, msr_indices)),
            events=bytes(vcpu.get_vcpu_events()),
        )

    def restore(self, vcpu, xsave_size: int) -> None:
        """Write this state into ``vcpu`` (a new vCPU of the same index, not yet run)."""
        if len(self.xsave) > xsave_size:
            raise StateError(f"vcpu {self.index}: its XSAVE image ({len(self.xsave)} bytes) holds state "
                             f"this host's KVM cannot take ({xsave_size} bytes)")
        xsave = kb.xsave_type(xsave_size)()
        ctypes.memmove(ctypes.addressof(xsave), self.xsave, len(self.xsave))
        xcrs = _load(kb.kvm_xcrs, self.xcrs, "xcrs")
        events = _load(kb.kvm_vcpu_events, self.events, "vcpu events")
        events.flags |= _EVENTS_RESTORE_FLAGS
        try:
            vcpu.set_cpuid2(self.cpuid_entries())
            vcpu.set_mp_state(self.mp_state)
            vcpu.set_regs(_load(kb.kvm_regs, self.regs, "regs"))
            vcpu.set_sregs(_load(kb.kvm_sregs, self.sregs, "sregs"))
            vcpu.set_xsave(xsave)
            if xcrs.nr_xcrs:  # a host without XSAVE saves none, and its KVM refuses KVM_SET_XCRS outright
                vcpu.set_xcrs(xcrs)
            vcpu.set_debugregs(_load(kb.kvm_debugregs, self.debugregs, "debug registers"))
            vcpu.set_lapic(_load(kb.kvm_lapic_state, self.lapic, "lapic"))
            vcpu.set_msrs(dict(self.msrs))
            vcpu.set_vcpu_events(events)
        except KvmError as err:
            raise StateError(f"vcpu {self.index}: KVM refused the saved state: {err}") from err

    def cpuid_entries(self) -> list[kb.kvm_cpuid_entry2]:
        return [kb.kvm_cpuid_entry2.from_buffer_copy(self.cpuid, offset)
                for offset in range(0, len(self.cpuid), _CPUID_ENTRY_SIZE)]

    # --- As a record: plain msgpack-able values. ---

    def to_record(self) -> dict:
        return {"index": self.index, "cpuid": self.cpuid, "mp_state": self.mp_state, "regs": self.regs,
                "sregs": self.sregs, "xsave": self.xsave, "xcrs": self.xcrs, "debugregs": self.debugregs,
                "lapic": self.lapic, "msrs": [list(pair) for pair in self.msrs], "events": self.events}

    @classmethod
    def from_record(cls, record: object) -> "VcpuState":
        """Checked field by field: sizes, types, the MSR list (a record may come off a network)."""
        if not isinstance(record, dict):
            raise StateError(f"a vcpu record is a {type(record).__name__}, not a map")
        try:
            index = _uint(record["index"], "vcpu index", 32)
            cpuid, xsave = record["cpuid"], record["xsave"]
            if not isinstance(cpuid, bytes) or len(cpuid) % _CPUID_ENTRY_SIZE:
                raise StateError(f"vcpu {index}: CPUID is not a whole number of entries")
            if not isinstance(xsave, bytes) or len(xsave) < ctypes.sizeof(kb.kvm_xsave) or len(xsave) % 4:
                raise StateError(f"vcpu {index}: the XSAVE image is not at least 4096 bytes of 32-bit words")
            msrs = record["msrs"]
            if not isinstance(msrs, list) or not all(isinstance(p, list) and len(p) == 2 for p in msrs):
                raise StateError(f"vcpu {index}: MSRs are not a list of [index, value] pairs")
            state = cls(index=index, cpuid=cpuid, mp_state=_uint(record["mp_state"], "MP state", 32),
                        regs=record["regs"], sregs=record["sregs"], xsave=xsave, xcrs=record["xcrs"],
                        debugregs=record["debugregs"], lapic=record["lapic"],
                        msrs=tuple((_uint(i, "MSR index", 32), _uint(v, "MSR value")) for i, v in msrs),
                        events=record["events"])
        except KeyError as err:
            raise StateError(f"a vcpu record lacks {err}") from None
        for ctype, data, what in ((kb.kvm_regs, state.regs, "regs"), (kb.kvm_sregs, state.sregs, "sregs"),
                                  (kb.kvm_xcrs, state.xcrs, "xcrs"), (kb.kvm_debugregs, state.debugregs, "debugregs"),
                                  (kb.kvm_lapic_state, state.lapic, "lapic"),
                                  (kb.kvm_vcpu_events, state.events, "events")):
            _load(ctype, data, f"vcpu {index} {what}")
        return state


@dataclass(frozen=True)
class VmState:
    """The VM-wide chips: both i8259s and the IOAPIC, the PIT, the kvmclock."""

    irqchips: tuple[bytes, ...]  # kvm_irqchip for PIC master, PIC slave, IOAPIC
    pit: bytes
    clock: bytes

    @classmethod
    def capture(cls, vm) -> "VmState":
        """Read ``vm`` (kvm.system.Vm, with the in-kernel irqchip and PIT)."""
        return cls(irqchips=tuple(bytes(vm.get_irqchip(chip)) for chip in _IRQCHIPS),
                   pit=bytes(vm.get_pit2()), clock=bytes(vm.get_clock()))

    def restore(self, vm) -> None:
        """Write the chips and the clock back; the guest's kvmclock goes on from where it stopped.

        The clock is set without KVM_CLOCK_REALTIME, so the time the VM spent
        saved or in flight does not pass for the guest (its TSC, an MSR
        above, stops likewise).
        """
        clock = _load(kb.kvm_clock_data, self.clock, "kvmclock")
        clock.flags = 0
        try:
            for chip_id, data in zip(_IRQCHIPS, self.irqchips):
                chip = _load(kb.kvm_irqchip, data, "irqchip")
                if chip.chip_id != chip_id:
                    raise StateError(f"irqchip record {chip_id} holds chip {chip.chip_id}")
                vm.set_irqchip(chip)
            vm.set_pit2(_load(kb.kvm_pit_state2, self.pit, "PIT"))
            vm.set_clock(clock)
        except KvmError as err:
            raise StateError(f"KVM refused the saved VM state: {err}") from err

    def to_record(self) -> dict:
        return {"irqchips": list(self.irqchips), "pit": self.pit, "clock": self.clock}

    @classmethod
    def from_record(cls, record: object) -> "VmState":
        if not isinstance(record, dict) or not isinstance(record.get("irqchips"), list):
            raise StateError("the VM record is not a map with a list of irqchips")
        if len(record["irqchips"]) != len(_IRQCHIPS):
            raise StateError(f"the VM record has {len(record['irqchips'])} irqchips, not {len(_IRQCHIPS)}")
        state = cls(tuple(record["irqchips"]), record.get("pit"), record.get("clock"))
        for data in state.irqchips:
            _load(kb.kvm_irqchip, data, "irqchip")
        _load(kb.kvm_pit_state2, state.pit, "PIT")
        _load(kb.kvm_clock_data, state.clock, "kvmclock")
        return state
