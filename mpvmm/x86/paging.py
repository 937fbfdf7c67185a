"""Identity page tables: the first 4 GiB mapped with 2 MiB pages.

The built-in guest runs at CPL 3, so every entry carries the user bit; a
Linux kernel builds its own tables and never sees these.
"""

import struct

from mpvmm.x86 import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_HUGE = 1 << 7  # in a page directory entry: maps 2 MiB directly
HUGE_PAGE_SIZE = 2 * layout.MIB
ENTRIES_PER_TABLE = 512


def identity_tables(user: bool = True) -> list[tuple[layout.GuestAddress, bytes]]:
    """The PML4, the PDPT and the page directories, each with its guest address."""
    flags = PTE_PRESENT | PTE_WRITABLE | (PTE_USER if user else 0)
    pml4 = struct.pack("<Q", layout.BOOT_PDPT_ADDR | flags)
    pdpt = b"".join(
        struct.pack("<Q", (layout.BOOT_PD_ADDR + i * layout.PAGE_SIZE) | flags)
        for i in range(layout.BOOT_PD_COUNT)
    )
    tables = [(layout.BOOT_PML4_ADDR, pml4), (layout.BOOT_PDPT_ADDR, pdpt)]
    for directory in range(layout.BOOT_PD_COUNT):
        first = directory * ENTRIES_PER_TABLE
        entries = b"".join(
            struct.pack("<Q", ((first + i) * HUGE_PAGE_SIZE) | flags | PTE_HUGE)
            for i in range(ENTRIES_PER_TABLE)
        )
        tables.append((layout.GuestAddress(layout.BOOT_PD_ADDR + directory * layout.PAGE_SIZE), entries))
    return tables
