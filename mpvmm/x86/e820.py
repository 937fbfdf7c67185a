"""The e820 memory map a firmware-less guest gets in its zero page.

Like Firecracker's: base memory up to the EBDA is RAM (the AP real-mode
trampoline must find some below 1 MiB), the EBDA, the MP/ACPI tables and the
BIOS area up to 1 MiB are reserved, and the rest of guest RAM is RAM, split
around the MMIO hole like ``GuestMemory.regions()``.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from mpvmm.x86 import layout

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_MAX_ENTRIES = 128  # boot_params.e820_table's capacity
ENTRY = struct.Struct("<QQI")  # addr, size, type: 20 bytes, packed


class E820Entry(NamedTuple):
    address: int
    size: int
    type: int


def memory_map(ram_regions: list[tuple[int, int]]) -> list[E820Entry]:
    """The map for guest RAM given as ``(guest_address, size)`` regions.

    The first region must start at 0 and reach past 1 MiB: a Linux kernel
    needs both base memory and memory above the BIOS area.
    """
    entries = []
    for address, size in sorted(ram_regions):
        end = address + size
        if address == 0:
            if end <= layout.LINUX_HIGH_MEMORY:
                raise ValueError("guest RAM must reach past 1 MiB to boot Linux")
            entries.append(E820Entry(0, layout.LINUX_EBDA_START, E820_RAM))
            entries.append(E820Entry(layout.LINUX_EBDA_START,
                                     layout.LINUX_HIGH_MEMORY - layout.LINUX_EBDA_START, E820_RESERVED))
            entries.append(E820Entry(layout.LINUX_HIGH_MEMORY, end - layout.LINUX_HIGH_MEMORY, E820_RAM))
        else:
            entries.append(E820Entry(address, size, E820_RAM))
    if not entries or entries[0].address != 0:
        raise ValueError("guest RAM must start at guest-physical address 0")
    return entries


def pack(entries: list[E820Entry]) -> bytes:
    if len(entries) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(entries)} e820 entries; boot_params holds {E820_MAX_ENTRIES}")
    return b"".join(ENTRY.pack(*entry) for entry in entries)
