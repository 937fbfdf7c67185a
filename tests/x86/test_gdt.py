"""GDT descriptors and their KVM segments, field by field (like Firecracker's gdt.rs)."""

import pytest

from mpvmm.x86 import gdt
from mpvmm.x86.gdt import gdt_entry, kvm_segment_from_gdt, tss_descriptor


# The descriptors every x86-64 kernel uses for a flat 4 GiB segment, as
# written in Linux's GDT_ENTRY_INIT tables.
@pytest.mark.parametrize(
    "flags, encoded",
    [
        (gdt.FLAGS_KERNEL_CODE64, 0x00AF9B000000FFFF),
        (gdt.FLAGS_KERNEL_DATA, 0x00CF93000000FFFF),
        (gdt.FLAGS_USER_CODE64, 0x00AFFB000000FFFF),
        (gdt.FLAGS_USER_DATA, 0x00CFF3000000FFFF),
    ],
)
def test_flat_descriptors_encode_as_linux_writes_them(flags, encoded):
    assert gdt_entry(flags, 0, 0xFFFFF) == encoded


def test_kernel_code64_fields():
    segment = kvm_segment_from_gdt(gdt_entry(0xA09B, 0x100000, 0xFFFFF), 1)
    # 'A': G=1, D/B=0, L=1, AVL=0
    assert segment.g == 1
    assert segment.db == 0
    assert segment.l == 1
    assert segment.avl == 0
    # '9': present, DPL 0, code/data (S=1)
    assert segment.present == 1
    assert segment.dpl == 0
    assert segment.s == 1
    # 'B': execute/read, accessed
    assert segment.type == 0xB
    assert segment.base == 0x100000
    assert segment.limit == 0xFFFFFFFF  # 0xFFFFF pages of 4 KiB
    assert segment.unusable == 0
    assert segment.selector == 0x08


def test_user_code64_has_dpl3_and_rpl3_selector():
    segment = kvm_segment_from_gdt(gdt_entry(0xA0FB, 0, 0xFFFFF), 4)
    assert segment.dpl == 3
    assert segment.selector == 4 * 8 | 3
    assert segment.selector & 3 == 3
    assert (segment.type, segment.s, segment.l, segment.db, segment.g) == (0xB, 1, 1, 0, 1)
    assert segment.present == 1
    assert segment.unusable == 0


def test_kernel_data_fields():
    segment = kvm_segment_from_gdt(gdt_entry(0xC093, 0, 0xFFFFF), 2)
    assert segment.db == 1
    assert segment.l == 0
    assert segment.g == 1
    assert segment.type == 0x3  # read/write, accessed
    assert segment.s == 1
    assert segment.dpl == 0
    assert segment.present == 1
    assert segment.limit == 0xFFFFFFFF
    assert segment.selector == 0x10


def test_user_data_fields():
    segment = kvm_segment_from_gdt(gdt_entry(0xC0F3, 0, 0xFFFFF), 3)
    assert (segment.type, segment.s, segment.db, segment.dpl) == (0x3, 1, 1, 3)
    assert segment.selector == 3 * 8 | 3


def test_base_and_limit_are_split_across_the_descriptor():
    entry = gdt_entry(0x0093, 0x12345678, 0xABCDE)
    # limit[15:0] | base[23:0] | access | limit[19:16], flags | base[31:24]
    assert entry & 0xFFFF == 0xBCDE
    assert (entry >> 16) & 0xFFFFFF == 0x345678
    assert (entry >> 40) & 0xFF == 0x93
    assert (entry >> 48) & 0xF == 0xA
    assert (entry >> 52) & 0xF == 0x0
    assert (entry >> 56) & 0xFF == 0x12
    assert entry == 0x120A93345678BCDE


def test_base_and_limit_round_trip_without_granularity():
    segment = kvm_segment_from_gdt(gdt_entry(0x0093, 0x12345678, 0xABCDE), 0)
    assert segment.base == 0x12345678
    assert segment.limit == 0xABCDE  # G=0: the limit is in bytes
    assert segment.g == 0
    assert segment.db == 0


@pytest.mark.parametrize(
    "raw_limit, byte_limit", [(0x0, 0xFFF), (0x1, 0x1FFF), (0x12345, 0x12345FFF), (0xFFFFF, 0xFFFFFFFF)]
)
def test_granular_limit_is_scaled_to_pages(raw_limit, byte_limit):
    segment = kvm_segment_from_gdt(gdt_entry(0x8093, 0, raw_limit), 0)  # G=1, D/B=0
    assert segment.g == 1
    assert segment.limit == byte_limit


def test_flags_limit_nibble_and_wide_values_are_masked():
    # Bits 8-11 of the flags word are where limit[19:16] goes; they must not leak in.
    assert gdt_entry(0xAF9B, 0, 0xFFFFF) == gdt_entry(0xA09B, 0, 0xFFFFF)
    # A base above 4 GiB or a limit above 20 bits does not fit an 8-byte descriptor.
    assert gdt_entry(0xA09B, (1 << 32) | 0x1000, 0xFFFFF) == gdt_entry(0xA09B, 0x1000, 0xFFFFF)
    assert gdt_entry(0xA09B, 0, 0x1FFFFF) == gdt_entry(0xA09B, 0, 0xFFFFF)
    assert gdt_entry(0xA09B, 0xFFFFFFFF, 0xFFFFF) < 1 << 64


def test_not_present_descriptor_is_unusable():
    segment = kvm_segment_from_gdt(gdt_entry(0xC093 & ~0x80, 0, 0xFFFFF), 2)
    assert segment.present == 0
    assert segment.unusable == 1


def test_null_descriptor_is_unusable_with_null_selector():
    segment = kvm_segment_from_gdt(0, 0)
    assert segment.present == 0
    assert segment.unusable == 1
    assert segment.selector == 0


def test_avl_bit_is_decoded():
    assert kvm_segment_from_gdt(gdt_entry(0xD093, 0, 0), 0).avl == 1
    assert kvm_segment_from_gdt(gdt_entry(0xC093, 0, 0), 0).avl == 0


def test_tss_descriptor_splits_a_64_bit_base():
    base = 0x1234_5678_9ABC_D000
    low, high = tss_descriptor(base)
    assert high == 0x12345678
    assert high < 1 << 32  # bits 32-63 of the second slot are reserved, zero
    segment = kvm_segment_from_gdt(low, 5)
    assert (high << 32) | segment.base == base
    assert segment.type == 0xB  # busy 64-bit TSS
    assert segment.s == 0  # a system segment
    assert segment.present == 1
    assert segment.dpl == 0
    assert segment.g == 0
    assert segment.limit == gdt.TSS_LIMIT
    assert segment.selector == 0x28


def test_tss_limit_covers_the_io_bitmap_and_its_terminator():
    # The limit is the offset of the last valid byte: the 0xFF after the bitmap.
    assert gdt.TSS_LIMIT == gdt.TSS_SIZE + 65536 // 8
    assert gdt.TSS_LIMIT < 1 << 20  # fits the descriptor with G=0


def test_tss_descriptor_of_a_low_base_has_zero_high_half():
    low, high = tss_descriptor(0x2000)
    assert high == 0
    assert kvm_segment_from_gdt(low, 5).base == 0x2000
