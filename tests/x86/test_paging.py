"""The identity page tables, walked in Python the way the MMU walks them."""

import struct

import pytest

from mpvmm.x86 import layout, paging

ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # bits 12-51 of an entry


class PageFault(Exception):
    pass


def _as_memory(tables):
    """A read-a-u64 function over the tables at their guest addresses; zero elsewhere."""
    pages = {}
    for address, data in tables:
        assert address % layout.PAGE_SIZE == 0
        assert len(data) <= layout.PAGE_SIZE and len(data) % 8 == 0
        assert address not in pages, "two tables at one address"
        pages[address] = data.ljust(layout.PAGE_SIZE, b"\0")

    def read_u64(address):
        page = pages.get(address & ~(layout.PAGE_SIZE - 1))
        if page is None:
            raise AssertionError(f"the walk read {address:#x}, which holds no table")
        return struct.unpack_from("<Q", page, address % layout.PAGE_SIZE)[0]

    return read_u64


def walk(read_u64, cr3, linear):
    """(physical address, writable, user) for ``linear``, as 4-level paging does."""
    writable = user = True
    table = cr3 & ADDRESS_MASK
    for level, shift in (("PML4", 39), ("PDPT", 30), ("PD", 21)):
        entry = read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & paging.PTE_PRESENT:
            raise PageFault(f"{level} entry not present for {linear:#x}")
        writable &= bool(entry & paging.PTE_WRITABLE)
        user &= bool(entry & paging.PTE_USER)
        if level == "PD":
            assert entry & paging.PTE_HUGE, "the tables map 2 MiB pages only"
            frame = entry & ADDRESS_MASK & ~(paging.HUGE_PAGE_SIZE - 1)
            return frame | (linear & (paging.HUGE_PAGE_SIZE - 1)), writable, user
        assert not entry & paging.PTE_HUGE, f"unexpected huge page at the {level} level"
        table = entry & ADDRESS_MASK
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def user_tables():
    return paging.identity_tables(user=True)


def test_tables_sit_at_the_layout_addresses(user_tables):
    addresses = [address for address, _ in user_tables]
    assert addresses[0] == layout.BOOT_PML4_ADDR
    assert addresses[1] == layout.BOOT_PDPT_ADDR
    assert addresses[2:] == [layout.BOOT_PD_ADDR + i * layout.PAGE_SIZE for i in range(layout.BOOT_PD_COUNT)]
    assert all(len(data) <= layout.PAGE_SIZE for _, data in user_tables)
    # The tables end before the guest parameter block.
    assert addresses[-1] + layout.PAGE_SIZE <= layout.GUEST_PARAMS_ADDR


@pytest.mark.parametrize(
    "linear", [0, 0x1234, 0x100000, 0x1FFFFF, 0x200000, layout.MMIO_TESTDEV_ADDR, 0xD0000ABC, 4 * layout.GIB - 1]
)
def test_walk_maps_address_to_itself(user_tables, linear):
    physical, writable, user = walk(_as_memory(user_tables), layout.BOOT_PML4_ADDR, linear)
    assert physical == linear
    assert writable
    assert user


def test_nothing_is_mapped_at_or_above_4_gib(user_tables):
    read_u64 = _as_memory(user_tables)
    with pytest.raises(PageFault):
        walk(read_u64, layout.BOOT_PML4_ADDR, 4 * layout.GIB)
    with pytest.raises(PageFault):
        walk(read_u64, layout.BOOT_PML4_ADDR, 1 << 39)


def test_every_2mib_page_of_4gib_maps_to_itself(user_tables):
    flags = paging.PTE_PRESENT | paging.PTE_WRITABLE | paging.PTE_USER | paging.PTE_HUGE
    directories = b"".join(data for _, data in user_tables[2:])
    entries = struct.unpack(f"<{len(directories) // 8}Q", directories)
    assert len(entries) == 4 * layout.GIB // paging.HUGE_PAGE_SIZE == 2048
    for page, entry in enumerate(entries):
        assert entry == page * paging.HUGE_PAGE_SIZE | flags, f"page {page}"


def test_upper_levels_point_at_the_next_tables(user_tables):
    flags = paging.PTE_PRESENT | paging.PTE_WRITABLE | paging.PTE_USER
    (pml4_entry,) = struct.unpack("<Q", user_tables[0][1])
    assert pml4_entry == layout.BOOT_PDPT_ADDR | flags
    pdpt = struct.unpack(f"<{layout.BOOT_PD_COUNT}Q", user_tables[1][1])
    assert pdpt == tuple((layout.BOOT_PD_ADDR + i * layout.PAGE_SIZE) | flags for i in range(layout.BOOT_PD_COUNT))


def test_user_false_drops_the_user_bit_everywhere():
    tables = paging.identity_tables(user=False)
    for _, data in tables:
        for (entry,) in struct.iter_unpack("<Q", data):
            assert entry & paging.PTE_PRESENT
            assert entry & paging.PTE_WRITABLE
            assert not entry & paging.PTE_USER
    physical, writable, user = walk(_as_memory(tables), layout.BOOT_PML4_ADDR, 0xD0000000)
    assert (physical, writable, user) == (0xD0000000, True, False)
