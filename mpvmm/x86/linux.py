"""The vCPU state a 64-bit Linux entry expects (boot.rst, "64-bit boot protocol").

Long mode with paging on an identity map, a flat GDT where ``__BOOT_CS`` is
0x10 and ``__BOOT_DS`` 0x18, interrupts off, RSI pointing to boot_params.
Every vCPU also gets Linux-friendly CPUID, the MSRs firmware would have
left, and its LAPIC's LINT0 as ExtINT (the PIC's output) and LINT1 as NMI,
as a PC BIOS programs them; application processors then wait in KVM's
UNINITIALIZED state for the kernel's INIT/SIPI.
"""

from __future__ import annotations

import os
import struct

from mpvmm.kvm.bindings_x86 import kvm_cpuid_entry2, kvm_fpu, kvm_regs, kvm_sregs
from mpvmm.x86 import gdt, layout, paging
from mpvmm.x86.cpuid import vcpu_cpuid

# The kernel command line when --cmdline is not given: the console on COM1, and
# the way out of a panic or reboot that the supervisor sees as a reboot.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux"

# GDT slots: __BOOT_CS = 2 * 8, __BOOT_DS = 3 * 8; a TSS after them because
# VM entry into 64-bit mode needs a usable TR (the kernel loads its own).
FLAGS_TSS32_BUSY = 0x808B  # present, type 11, G=1: what Firecracker loads
BOOT_GDT = (
    0,
    0,
    gdt.gdt_entry(gdt.FLAGS_KERNEL_CODE64, 0, 0xFFFFF),
    gdt.gdt_entry(gdt.FLAGS_KERNEL_DATA, 0, 0xFFFFF),
    gdt.gdt_entry(FLAGS_TSS32_BUSY, 0, 0xFFFFF),
)
BOOT_CS_INDEX, BOOT_DS_INDEX, BOOT_TSS_INDEX = 2, 3, 4

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31
CR0_BOOT = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG  # 0x80050033, Linux's CR0_STATE
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED = 1 << 1
FPU_CONTROL_WORD = 0x37F  # the FNINIT state
MXCSR_DEFAULT = 0x1F80  # all SSE exceptions masked

# --- MSRs firmware leaves behind (docs/linux.md, "Initial vCPU state"). ---
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6  # MTRRs on, default type write-back
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE_WRITEBACK,
}

# --- LAPIC (the kvm_lapic_state page is the APIC's register page). ---
APIC_LVT0_OFFSET = 0x350
APIC_LVT1_OFFSET = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
APIC_DELIVERY_MODE_SHIFT = 8
APIC_DELIVERY_MODE_MASK = 0x7 << APIC_DELIVERY_MODE_SHIFT

# --- CPUID patches on top of cpuid.vcpu_cpuid. ---
LEAF_FEATURES = 0x1
LEAF_THERMAL = 0x6
ECX_PDCM = 1 << 15  # perfmon/debug MSR: not emulated, so not offered
# CMPXCHG16B: the PVM-based KVM of these machines emulates ring-0 code and
# failed on `lock cmpxchg16b` (KVM_EXIT_INTERNAL_ERROR, emulation, in SLUB's
# cmpxchg_double right after "Memory:"); with the bit cleared later boots got
# past that point. Not fully proven: on this host some leaf-1 bits the guest
# sees are not ours (XSAVE showed through while absent from our table).
# Without it Linux 6.1 takes SLUB's lock-based path; on hardware KVM that
# costs little.
ECX_CX16 = 1 << 13
ECX_TSC_DEADLINE = 1 << 24  # KVM's in-kernel LAPIC has it
ECX_ENERGY_PERF_BIAS = 1 << 3  # leaf 6: an MSR KVM does not give guests


def gdt_bytes() -> bytes:
    return struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT)


def identity_tables() -> list[tuple[layout.GuestAddress, bytes]]:
    """4 GiB identity-mapped without the user bit: covers any kernel's init_size."""
    return paging.identity_tables(user=False)


def boot_sregs(sregs: kvm_sregs) -> None:
    """Turn KVM's reset-state sregs into the 64-bit boot protocol's."""
    code = gdt.kvm_segment_from_gdt(BOOT_GDT[BOOT_CS_INDEX], BOOT_CS_INDEX)
    data = gdt.kvm_segment_from_gdt(BOOT_GDT[BOOT_DS_INDEX], BOOT_DS_INDEX)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = gdt.kvm_segment_from_gdt(BOOT_GDT[BOOT_TSS_INDEX], BOOT_TSS_INDEX)
    sregs.gdt.base = layout.LINUX_GDT_ADDR
    sregs.gdt.limit = len(BOOT_GDT) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_BOOT
    sregs.cr3 = layout.BOOT_PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def boot_regs(entry: int) -> kvm_regs:
    return kvm_regs(rip=entry, rsi=layout.LINUX_ZERO_PAGE_ADDR, rsp=layout.LINUX_BOOT_STACK_TOP,
                    rbp=layout.LINUX_BOOT_STACK_TOP, rflags=RFLAGS_RESERVED)


def boot_fpu() -> kvm_fpu:
    return kvm_fpu(fcw=FPU_CONTROL_WORD, mxcsr=MXCSR_DEFAULT)


def boot_msrs(supported: set[int] | None = None) -> dict[int, int]:
    """BOOT_MSRS, less any this host's KVM does not list (a missing one is not fatal)."""
    if supported is None:
        return dict(BOOT_MSRS)
    return {index: value for index, value in BOOT_MSRS.items() if index in supported}


def _set_lvt(regs, offset: int, mode: int) -> None:
    value = struct.unpack_from("<I", regs, offset)[0]
    value = (value & ~APIC_DELIVERY_MODE_MASK) | (mode << APIC_DELIVERY_MODE_SHIFT)
    struct.pack_into("<I", regs, offset, value)


def set_lint_modes(lapic) -> None:
    """LINT0 -> ExtINT, LINT1 -> NMI in a ``kvm_lapic_state``, other bits kept."""
    _set_lvt(lapic.regs, APIC_LVT0_OFFSET, APIC_MODE_EXTINT)
    _set_lvt(lapic.regs, APIC_LVT1_OFFSET, APIC_MODE_NMI)


def emulating_kvm_host() -> bool:
    """True on a PVM-based KVM (these machines), whose ring-0 emulator lacks CMPXCHG16B."""
    return os.path.isdir("/sys/module/kvm_pvm")


def linux_cpuid(supported: list[kvm_cpuid_entry2], index: int, cpus: int,
                hide_cx16: bool | None = None) -> list[kvm_cpuid_entry2]:
    """``vcpu_cpuid`` plus the bits a Linux guest should not be shown.

    CMPXCHG16B is hidden only where the host cannot run it (``hide_cx16``
    defaults to ``emulating_kvm_host()``); hardware KVM keeps it.
    """
    if hide_cx16 is None:
        hide_cx16 = emulating_kvm_host()
    entries = vcpu_cpuid(supported, index, cpus)
    for entry in entries:
        if entry.function == LEAF_FEATURES:
            entry.ecx &= ~(ECX_PDCM | (ECX_CX16 if hide_cx16 else 0))
        elif entry.function == LEAF_THERMAL:
            entry.ecx &= ~ECX_ENERGY_PERF_BIAS
    return entries
