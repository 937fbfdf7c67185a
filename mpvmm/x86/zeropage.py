"""boot_params, the "zero page" a 64-bit Linux entry reads through RSI.

Documentation/arch/x86/zero-page.rst and boot.rst: the page is zeroed, the
bzImage's setup header is copied in as is (or, for a vmlinux, the few fields
a kernel reads are built), and the loader fills in what it decided: where
the command line and the initrd are, the memory map and the ACPI RSDP.
"""

from __future__ import annotations

import struct

from mpvmm.x86 import bzimage, e820

ZERO_PAGE_SIZE = 4096
ACPI_RSDP_ADDR_OFFSET = 0x070  # u64
EXT_RAMDISK_IMAGE_OFFSET = 0x0C0  # u32: bits 63:32 of ramdisk_image
EXT_RAMDISK_SIZE_OFFSET = 0x0C4
EXT_CMD_LINE_PTR_OFFSET = 0x0C8
E820_ENTRIES_OFFSET = 0x1E8  # u8
SENTINEL_OFFSET = 0x1EF  # u8: must stay 0, or the kernel wipes fields it thinks stale
TYPE_OF_LOADER_OFFSET = 0x210  # u8
RAMDISK_IMAGE_OFFSET = 0x218  # u32
RAMDISK_SIZE_OFFSET = 0x21C  # u32
CMD_LINE_PTR_OFFSET = 0x228  # u32
E820_TABLE_OFFSET = 0x2D0

# "Undefined" loader: any non-zero value, or the kernel ignores the initrd.
TYPE_OF_LOADER_UNDEFINED = 0xFF
# The header a vmlinux gets: what a 2.15 bzImage would say about itself.
ELF_BOOT_PROTOCOL = 0x020F
ELF_KERNEL_ALIGNMENT = 0x1000000
# x86's COMMAND_LINE_SIZE is 2048, NUL included.
ELF_CMDLINE_SIZE = 2047


def _put(page: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into("<" + fmt, page, offset, value)


def build_zero_page(
    header: bzimage.SetupHeader | None,
    memory_map: list[e820.E820Entry],
    cmdline_address: int,
    initrd: tuple[int, int] | None = None,
    rsdp_address: int = 0,
) -> bytes:
    """The 4096-byte boot_params; ``initrd`` is ``(guest_address, size)``."""
    page = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        page[bzimage.SETUP_SECTS_OFFSET : bzimage.SETUP_SECTS_OFFSET + len(header.header_bytes)] = (
            header.header_bytes
        )
    else:
        _put(page, bzimage.BOOT_FLAG_OFFSET, "H", bzimage.BOOT_FLAG)
        _put(page, bzimage.HEADER_MAGIC_OFFSET, "I", bzimage.HEADER_MAGIC)
        _put(page, bzimage.VERSION_OFFSET, "H", ELF_BOOT_PROTOCOL)
        _put(page, bzimage.KERNEL_ALIGNMENT_OFFSET, "I", ELF_KERNEL_ALIGNMENT)
        _put(page, bzimage.CMDLINE_SIZE_OFFSET, "I", ELF_CMDLINE_SIZE)
    page[SENTINEL_OFFSET] = 0
    page[TYPE_OF_LOADER_OFFSET] = TYPE_OF_LOADER_UNDEFINED
    _put(page, CMD_LINE_PTR_OFFSET, "I", cmdline_address & 0xFFFFFFFF)
    _put(page, EXT_CMD_LINE_PTR_OFFSET, "I", cmdline_address >> 32)
    if initrd is not None:
        address, size = initrd
        _put(page, RAMDISK_IMAGE_OFFSET, "I", address & 0xFFFFFFFF)
        _put(page, EXT_RAMDISK_IMAGE_OFFSET, "I", address >> 32)
        _put(page, RAMDISK_SIZE_OFFSET, "I", size & 0xFFFFFFFF)
        _put(page, EXT_RAMDISK_SIZE_OFFSET, "I", size >> 32)
    _put(page, ACPI_RSDP_ADDR_OFFSET, "Q", rsdp_address)
    table = e820.pack(memory_map)
    page[E820_ENTRIES_OFFSET] = len(memory_map)
    page[E820_TABLE_OFFSET : E820_TABLE_OFFSET + len(table)] = table
    return bytes(page)


def cmdline_capacity(header: bzimage.SetupHeader | None) -> int:
    """The longest command line the kernel accepts, without the NUL."""
    return header.cmdline_size if header is not None else ELF_CMDLINE_SIZE
