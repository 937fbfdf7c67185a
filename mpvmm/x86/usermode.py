"""Entering a vCPU directly in 64-bit long mode at CPL 3.

The built-in guest has no ring-0 code at all (supervisor-mode code is
emulated instruction by instruction on these machines: docs/design.md,
"PVM hosts"), so
the supervisor sets up what firmware and a kernel would have: a GDT with
user segments, a TSS (VM entry insists on a valid TR), identity page tables
with the user bit, and CR0/CR4/EFER for paging in long mode. Interrupts stay
off and there is no IDT, so any guest exception ends in a triple fault that
the VMM reports.

Port I/O at CPL 3 is allowed twice over: RFLAGS.IOPL is 3, and the TSS
carries an all-zero I/O permission bitmap. Hardware KVM honours IOPL alone;
the PVM-based KVM of these machines runs guest user mode with the host's
IOPL of 0 and decides by the guest's bitmap instead (measured: with IOPL 3
and no bitmap every `out` ends in #GP).
"""

import struct

from mpvmm.kvm.bindings import KVM_MP_STATE_RUNNABLE, kvm_regs, kvm_sregs
from mpvmm.x86 import gdt, layout, paging

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as one
RFLAGS_IOPL3 = 3 << 12

# GDT slots: 0 null, 1 kernel code, 2 kernel data, 3 user data, 4 user code,
# 5-6 the TSS. User data precedes user code as SYSRET would want it.
GDT_ENTRIES = (
    0,
    gdt.gdt_entry(gdt.FLAGS_KERNEL_CODE64, 0, 0xFFFFF),
    gdt.gdt_entry(gdt.FLAGS_KERNEL_DATA, 0, 0xFFFFF),
    gdt.gdt_entry(gdt.FLAGS_USER_DATA, 0, 0xFFFFF),
    gdt.gdt_entry(gdt.FLAGS_USER_CODE64, 0, 0xFFFFF),
    *gdt.tss_descriptor(layout.BOOT_TSS_ADDR),
)
USER_DATA_INDEX = 3
USER_CODE_INDEX = 4
TSS_INDEX = 5


def write_boot_structures(memory) -> None:
    """GDT, TSS and identity page tables, written once and shared by every vCPU."""
    memory.write(layout.BOOT_GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    # A zeroed TSS whose I/O bitmap (right after it) allows every port,
    # closed by the all-ones byte the CPU reads past the last port.
    io_bitmap_offset = struct.pack("<H", gdt.TSS_SIZE)
    memory.write(
        layout.BOOT_TSS_ADDR,
        bytes(gdt.TSS_SIZE - 2) + io_bitmap_offset + bytes(gdt.IO_BITMAP_SIZE) + b"\xff",
    )
    for address, table in paging.identity_tables(user=True):
        memory.write(address, table)


def set_user_mode_sregs(sregs: kvm_sregs) -> None:
    """Turn a vCPU's reset-state sregs into 64-bit CPL 3 with paging on."""
    code = gdt.kvm_segment_from_gdt(GDT_ENTRIES[USER_CODE_INDEX], USER_CODE_INDEX)
    data = gdt.kvm_segment_from_gdt(GDT_ENTRIES[USER_DATA_INDEX], USER_DATA_INDEX)
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    tss = gdt.kvm_segment_from_gdt(GDT_ENTRIES[TSS_INDEX], TSS_INDEX)
    tss.base = layout.BOOT_TSS_ADDR
    sregs.tr = tss
    sregs.ldt.unusable = 1
    sregs.ldt.present = 0
    sregs.gdt.base = layout.BOOT_GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = layout.BOOT_PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA


def user_mode_regs(entry: int, stack_top: int, *arguments: int) -> kvm_regs:
    """Registers at the entry point: up to two arguments in RDI and RSI (SysV ABI)."""
    if len(arguments) > 2:
        raise ValueError(f"at most two entry arguments fit RDI and RSI, not {len(arguments)}")
    regs = kvm_regs(rip=entry, rsp=stack_top, rflags=RFLAGS_RESERVED | RFLAGS_IOPL3)
    for name, value in zip(("rdi", "rsi"), arguments):
        setattr(regs, name, value)
    return regs


def enter_user_mode(vcpu, entry: int, stack_top: int, *arguments: int) -> None:
    """Start ``vcpu`` (a kvm.vcpu.Vcpu) at ``entry`` in 64-bit CPL 3, runnable at once."""
    sregs = vcpu.get_sregs()
    set_user_mode_sregs(sregs)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(user_mode_regs(entry, stack_top, *arguments))
    vcpu.set_mp_state(KVM_MP_STATE_RUNNABLE)
