"""GDT entries and their KVM segment form, like Firecracker's arch/x86_64/gdt.rs.

A descriptor is built once with ``gdt_entry(flags, base, limit)`` and turned
into the ``kvm_segment`` KVM loads with ``kvm_segment_from_gdt``, so the GDT
in guest memory and the segment registers can never disagree.
"""

from mpvmm.kvm.bindings_x86 import kvm_segment

# Access/flags words (the descriptor's bits 40-55): P, DPL, S, type; G, D/B, L.
FLAGS_KERNEL_CODE64 = 0xA09B  # present, DPL 0, code execute/read accessed, L=1, G=1
FLAGS_KERNEL_DATA = 0xC093  # present, DPL 0, data read/write accessed, D/B=1, G=1
FLAGS_USER_CODE64 = 0xA0FB  # as kernel code, DPL 3
FLAGS_USER_DATA = 0xC0F3  # as kernel data, DPL 3
FLAGS_TSS64_BUSY = 0x008B  # present, system segment type 11: busy 64-bit TSS

TSS_SIZE = 104  # a 64-bit TSS without an I/O permission bitmap
IO_BITMAP_SIZE = 65536 // 8  # one bit per port
# A TSS followed by a full I/O bitmap and the terminating all-ones byte.
TSS_LIMIT = TSS_SIZE + IO_BITMAP_SIZE  # the last byte, the terminator, included


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """One 8-byte descriptor from the 16-bit flags word, a base and a 20-bit limit."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def _bits(entry: int, shift: int, width: int) -> int:
    return (entry >> shift) & ((1 << width) - 1)


def kvm_segment_from_gdt(entry: int, table_index: int) -> kvm_segment:
    """The segment register KVM loads for the descriptor at ``table_index``.

    The selector's requested privilege level is the descriptor's DPL, so
    user segments come out as RPL 3 selectors.
    """
    granular = _bits(entry, 55, 1)
    limit = (_bits(entry, 48, 4) << 16) | _bits(entry, 0, 16)
    if granular:
        limit = (limit << 12) | 0xFFF
    present = _bits(entry, 47, 1)
    dpl = _bits(entry, 45, 2)
    return kvm_segment(
        base=(_bits(entry, 56, 8) << 24) | _bits(entry, 16, 24),
        limit=limit,
        selector=(table_index * 8) | dpl,
        type=_bits(entry, 40, 4),
        present=present,
        dpl=dpl,
        db=_bits(entry, 54, 1),
        s=_bits(entry, 44, 1),
        l=_bits(entry, 53, 1),
        g=granular,
        avl=_bits(entry, 52, 1),
        unusable=0 if present else 1,
    )


def tss_descriptor(base: int) -> tuple[int, int]:
    """A 64-bit TSS takes two GDT slots: the usual descriptor and base[63:32]."""
    return gdt_entry(FLAGS_TSS64_BUSY, base, TSS_LIMIT), base >> 32
