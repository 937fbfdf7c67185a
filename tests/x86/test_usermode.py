"""The boot structures in guest memory agree with the registers the vCPUs get."""

import struct

import pytest

from mpvmm.kvm.bindings_x86 import kvm_sregs
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.x86 import gdt, layout, paging, usermode
from tests.x86.test_paging import PageFault, walk

GDT_SLOTS = 7  # null, kernel code/data, user data/code, TSS (two slots)
IO_MAP_BASE_OFFSET = 102  # where a 64-bit TSS keeps its I/O-map base address
SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")


@pytest.fixture(scope="module")
def memory():
    memory = GuestMemory(4 * layout.MIB)
    usermode.write_boot_structures(memory)
    yield memory
    memory.close()


@pytest.fixture(scope="module")
def sregs():
    sregs = kvm_sregs()
    usermode.set_user_mode_sregs(sregs)
    return sregs


@pytest.fixture(scope="module")
def gdt_in_memory(memory, sregs):
    size = sregs.gdt.limit + 1
    assert size == GDT_SLOTS * 8
    return struct.unpack(f"<{GDT_SLOTS}Q", memory.read(sregs.gdt.base, size))


def _fields(segment):
    return {name: getattr(segment, name) for name in SEGMENT_FIELDS}


def test_gdt_is_at_the_layout_address(sregs, gdt_in_memory):
    assert sregs.gdt.base == layout.BOOT_GDT_ADDR
    assert gdt_in_memory[0] == 0


def test_cs_is_what_the_gdt_in_memory_says(sregs, gdt_in_memory):
    index = sregs.cs.selector >> 3
    assert _fields(sregs.cs) == _fields(gdt.kvm_segment_from_gdt(gdt_in_memory[index], index))
    assert sregs.cs.selector & 3 == 3  # CPL 3
    assert sregs.cs.dpl == 3
    assert sregs.cs.l == 1 and sregs.cs.db == 0  # 64-bit code
    assert sregs.cs.type == 0xB and sregs.cs.s == 1 and sregs.cs.present == 1


@pytest.mark.parametrize("name", ["ss", "ds", "es", "fs", "gs"])
def test_data_segments_are_what_the_gdt_in_memory_says(sregs, gdt_in_memory, name):
    segment = getattr(sregs, name)
    index = segment.selector >> 3
    assert _fields(segment) == _fields(gdt.kvm_segment_from_gdt(gdt_in_memory[index], index))
    assert segment.selector & 3 == 3
    assert segment.dpl == 3  # SS.DPL must equal CPL
    assert segment.type == 0x3 and segment.s == 1 and segment.present == 1


def test_tr_is_the_tss_descriptor_in_memory(sregs, gdt_in_memory):
    index = sregs.tr.selector >> 3
    decoded = gdt.kvm_segment_from_gdt(gdt_in_memory[index], index)
    high_half = gdt_in_memory[index + 1]
    assert _fields(sregs.tr) == _fields(decoded)
    assert (high_half << 32) | decoded.base == sregs.tr.base == layout.BOOT_TSS_ADDR
    assert sregs.tr.type == 0xB and sregs.tr.s == 0 and sregs.tr.present == 1
    assert sregs.tr.unusable == 0
    assert sregs.ldt.unusable == 1


def test_tss_io_bitmap_allows_every_port_and_is_terminated(memory, sregs):
    tss = memory.read(layout.BOOT_TSS_ADDR, gdt.TSS_SIZE)
    (io_map_base,) = struct.unpack_from("<H", tss, IO_MAP_BASE_OFFSET)
    assert io_map_base == gdt.TSS_SIZE == 104  # right after the 104-byte TSS
    assert tss == bytes(IO_MAP_BASE_OFFSET) + struct.pack("<H", 104)
    bitmap = memory.read(layout.BOOT_TSS_ADDR + io_map_base, 65536 // 8)
    assert bitmap == bytes(65536 // 8)
    terminator = io_map_base + 65536 // 8
    assert memory.read(layout.BOOT_TSS_ADDR + terminator, 1) == b"\xff"
    # A check of port 0xFFFF reads the bitmap's last byte and the terminator:
    # both must be within the TSS limit or every `out` faults.
    assert sregs.tr.limit >= terminator
    assert sregs.tr.g == 0


def test_tss_does_not_overlap_the_page_tables():
    assert layout.BOOT_GDT_ADDR + GDT_SLOTS * 8 <= layout.BOOT_TSS_ADDR
    assert layout.BOOT_TSS_ADDR + gdt.TSS_LIMIT + 1 <= layout.BOOT_PML4_ADDR


def test_control_registers_enable_long_mode_paging(sregs):
    assert sregs.cr0 & usermode.CR0_PE
    assert sregs.cr0 & usermode.CR0_PG
    assert sregs.cr0 & (1 << 31) and sregs.cr0 & 1
    assert sregs.cr4 & (1 << 5)  # PAE, required for long mode
    assert sregs.efer & (1 << 8)  # LME
    assert sregs.efer & (1 << 10)  # LMA
    assert sregs.cr3 == layout.BOOT_PML4_ADDR
    assert sregs.idt.limit == 0


def test_page_tables_in_memory_identity_map_user_pages(memory, sregs):
    def read_u64(address):
        return struct.unpack("<Q", memory.read(address, 8))[0]

    for linear in (0, layout.GUEST_PARAMS_ADDR, layout.GUEST_CODE_ADDR, layout.MMIO_TESTDEV_ADDR, 4 * layout.GIB - 1):
        assert walk(read_u64, sregs.cr3, linear) == (linear, True, True)
    with pytest.raises(PageFault):
        walk(read_u64, sregs.cr3, 4 * layout.GIB)
    assert memory.read(layout.BOOT_PD_ADDR, 8) == struct.pack(
        "<Q", paging.PTE_PRESENT | paging.PTE_WRITABLE | paging.PTE_USER | paging.PTE_HUGE
    )


def test_user_mode_regs_put_arguments_in_rdi_rsi_and_iopl3():
    regs = usermode.user_mode_regs(0x100000, 0x204000, 7, 0x20000)
    assert regs.rip == 0x100000
    assert regs.rsp == 0x204000
    assert regs.rdi == 7
    assert regs.rsi == 0x20000
    assert (regs.rflags >> 12) & 3 == 3  # IOPL
    assert regs.rflags & 2  # reserved bit 1
    assert not regs.rflags & (1 << 9)  # interrupts stay off
    assert regs.rax == regs.rdx == regs.rcx == 0


def test_user_mode_regs_with_one_argument_leaves_rsi_zero():
    regs = usermode.user_mode_regs(0x100000, 0x204000, 3)
    assert (regs.rdi, regs.rsi) == (3, 0)
