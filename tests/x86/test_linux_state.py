"""The 64-bit boot protocol's vCPU state, field by field."""

import struct

from mpvmm.kvm.bindings_x86 import kvm_cpuid_entry2, kvm_lapic_state, kvm_sregs
from mpvmm.x86 import layout, linux


def test_gdt_has_boot_cs_and_ds_at_the_protocols_selectors():
    sregs = kvm_sregs()
    linux.boot_sregs(sregs)
    assert sregs.cs.selector == 0x10 and sregs.ds.selector == 0x18 and sregs.ss.selector == 0x18
    assert (sregs.cs.l, sregs.cs.db, sregs.cs.type, sregs.cs.g, sregs.cs.dpl) == (1, 0, 0xB, 1, 0)
    assert (sregs.ds.l, sregs.ds.db, sregs.ds.type, sregs.ds.limit) == (0, 1, 3, 0xFFFFFFFF)
    assert sregs.tr.present and sregs.tr.type == 0xB
    assert sregs.gdt.base == layout.LINUX_GDT_ADDR and sregs.gdt.limit == len(linux.BOOT_GDT) * 8 - 1
    entries = struct.unpack("<5Q", linux.gdt_bytes())
    assert entries[2] == 0x00AF9B000000FFFF and entries[3] == 0x00CF93000000FFFF


def test_control_registers_are_long_mode_with_paging():
    sregs = kvm_sregs()
    linux.boot_sregs(sregs)
    assert sregs.cr0 == 0x80050033
    assert sregs.cr4 & linux.CR4_PAE
    assert sregs.efer == linux.EFER_LME | linux.EFER_LMA
    assert sregs.cr3 == layout.BOOT_PML4_ADDR


def test_entry_registers():
    regs = linux.boot_regs(0x1000000)
    assert (regs.rip, regs.rsi, regs.rflags) == (0x1000000, layout.LINUX_ZERO_PAGE_ADDR, 2)
    fpu = linux.boot_fpu()
    assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)


def test_identity_tables_have_no_user_bit_and_map_4gib():
    tables = dict(linux.identity_tables())
    pd = tables[layout.BOOT_PD_ADDR]
    first = struct.unpack_from("<Q", pd)[0]
    assert first & 0x87 == 0x83  # present, writable, 2 MiB page, supervisor only
    last_pd = tables[layout.GuestAddress(layout.BOOT_PD_ADDR + 3 * 4096)]
    assert struct.unpack_from("<Q", last_pd, 511 * 8)[0] & ~0xFFF == 4 * layout.GIB - 2 * layout.MIB


def test_lint0_extint_lint1_nmi_keep_other_bits():
    lapic = kvm_lapic_state()
    struct.pack_into("<I", lapic.regs, 0x350, 0x10000 | 0x300)  # masked, some old mode
    struct.pack_into("<I", lapic.regs, 0x360, 0x10000)
    linux.set_lint_modes(lapic)
    assert struct.unpack_from("<I", lapic.regs, 0x350)[0] == 0x10700
    assert struct.unpack_from("<I", lapic.regs, 0x360)[0] == 0x10400


def test_boot_msrs_skip_what_kvm_does_not_list():
    msrs = linux.boot_msrs({linux.MSR_IA32_MISC_ENABLE, linux.MSR_STAR})
    assert msrs == {linux.MSR_IA32_MISC_ENABLE: 1, linux.MSR_STAR: 0}
    assert linux.boot_msrs()[linux.MSR_MTRR_DEF_TYPE] == 0x806


def test_linux_cpuid_keeps_the_apic_id_and_hides_what_cannot_run():
    entries = [kvm_cpuid_entry2(function=1, ebx=0, ecx=linux.ECX_PDCM | linux.ECX_CX16 | 1, edx=0),
               kvm_cpuid_entry2(function=6, ecx=0xF)]
    patched = linux.linux_cpuid(entries, 3, 4, hide_cx16=True)
    assert patched[0].ebx >> 24 == 3
    assert patched[0].ecx & (linux.ECX_PDCM | linux.ECX_CX16) == 0 and patched[0].ecx & 1
    assert patched[1].ecx == 0xF & ~linux.ECX_ENERGY_PERF_BIAS
    assert entries[0].ecx & linux.ECX_CX16  # the input is not modified


def test_cmpxchg16b_is_kept_where_the_host_runs_it():
    entries = [kvm_cpuid_entry2(function=1, ecx=linux.ECX_PDCM | linux.ECX_CX16)]
    patched = linux.linux_cpuid(entries, 0, 1, hide_cx16=False)
    assert patched[0].ecx & linux.ECX_CX16 and not patched[0].ecx & linux.ECX_PDCM
