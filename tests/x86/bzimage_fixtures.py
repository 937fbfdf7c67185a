"""Synthetic bzImages: a real setup header around a payload of our choosing."""

from __future__ import annotations

import gzip
import lzma
import struct

from mpvmm.x86 import bzimage

SETUP_SECTS = 3
PROTECTED_MODE_OFFSET = (SETUP_SECTS + 1) * 512
PAYLOAD_OFFSET = 0x100  # from the start of the protected-mode part


def tiny_elf() -> bytes:
    """A 64-bit x86 ELF with one PT_LOAD of 16 bytes at 0x1000000 (a stand-in vmlinux)."""
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 62, 1, 0x1000000, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, 0x1000000, 0x1000000, 16, 32, 0x1000)
    image = bytearray(ehdr + phdr)
    image += bytes(0x1000 - len(image))
    image += b"\x90" * 15 + b"\xf4"
    return bytes(image)


def compress(data: bytes, fmt: str) -> bytes:
    size = struct.pack("<I", len(data))  # the kernel build appends this
    if fmt == "gzip":
        return gzip.compress(data) + size
    if fmt == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    if fmt == "lz4":
        import lz4.block

        block = lz4.block.compress(data, store_size=False)
        return struct.pack("<II", 0x184C2102, len(block)) + block + size
    if fmt == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data) + size
    if fmt == "unknown":
        return b"\x00\x11\x22\x33" + data
    raise ValueError(fmt)


def make_bzimage(payload: bytes, *, version: int = 0x020F, xloadflags: int = 0x7F,
                 cmdline_size: int = 2047, magic: int = bzimage.HEADER_MAGIC) -> bytes:
    image = bytearray(PROTECTED_MODE_OFFSET + PAYLOAD_OFFSET)
    image[bzimage.SETUP_SECTS_OFFSET] = SETUP_SECTS
    struct.pack_into("<H", image, bzimage.BOOT_FLAG_OFFSET, bzimage.BOOT_FLAG)
    image[bzimage.JUMP_OFFSET : bzimage.JUMP_OFFSET + 2] = bytes([0xEB, 0x6A])  # header ends at 0x26C
    struct.pack_into("<I", image, bzimage.HEADER_MAGIC_OFFSET, magic)
    struct.pack_into("<H", image, bzimage.VERSION_OFFSET, version)
    image[bzimage.LOADFLAGS_OFFSET] = bzimage.LOADED_HIGH
    struct.pack_into("<I", image, bzimage.INITRD_ADDR_MAX_OFFSET, 0x7FFFFFFF)
    struct.pack_into("<I", image, bzimage.KERNEL_ALIGNMENT_OFFSET, 0x200000)
    struct.pack_into("<H", image, bzimage.XLOADFLAGS_OFFSET, xloadflags)
    struct.pack_into("<I", image, bzimage.CMDLINE_SIZE_OFFSET, cmdline_size)
    struct.pack_into("<I", image, bzimage.PAYLOAD_OFFSET_OFFSET, PAYLOAD_OFFSET)
    struct.pack_into("<I", image, bzimage.PAYLOAD_LENGTH_OFFSET, len(payload))
    struct.pack_into("<Q", image, bzimage.PREF_ADDRESS_OFFSET, 0x1000000)
    struct.pack_into("<I", image, bzimage.INIT_SIZE_OFFSET, 0x400000)
    return bytes(image) + payload
