"""bzImage header checks and host-side payload decompression, on synthetic images."""

import os

import pytest

from mpvmm.x86 import bzimage
from mpvmm.x86.bzimage import KernelImageError, read_kernel
from tests.x86.bzimage_fixtures import PAYLOAD_OFFSET, PROTECTED_MODE_OFFSET, compress, make_bzimage, tiny_elf


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lz4", "zstd"])
def test_payload_is_decompressed_to_the_elf_inside(fmt):
    image = read_kernel(make_bzimage(compress(tiny_elf(), fmt)))
    assert image.kind == f"bzimage+{fmt}"
    assert image.vmlinux == tiny_elf()
    assert image.header.version == 0x020F
    assert image.header.cmdline_size == 2047
    assert image.header.protected_mode_offset == PROTECTED_MODE_OFFSET


def test_lz4_with_several_blocks():
    data = tiny_elf() + os.urandom(20000)
    import lz4.block

    blocks = [lz4.block.compress(data[i:i + 8192], store_size=False) for i in range(0, len(data), 8192)]
    payload = b"\x02\x21\x4c\x18" + b"".join(len(b).to_bytes(4, "little") + b for b in blocks)
    payload += len(data).to_bytes(4, "little")
    assert read_kernel(make_bzimage(payload)).vmlinux == data


def test_unknown_payload_falls_back_to_the_bzimage_entry():
    payload = compress(tiny_elf(), "unknown")
    image = read_kernel(make_bzimage(payload))
    assert image.kind == "bzimage"
    assert image.vmlinux is None
    assert image.protected_mode[PAYLOAD_OFFSET:] == payload


def test_vmlinux_is_taken_as_is():
    image = read_kernel(tiny_elf())
    assert (image.kind, image.header, image.vmlinux) == ("vmlinux", None, tiny_elf())


def test_header_bytes_are_the_setup_header_only():
    image = read_kernel(make_bzimage(compress(tiny_elf(), "gzip")))
    assert len(image.header.header_bytes) == 0x26C - 0x1F1


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty"),
        (os.urandom(4096), "not a Linux kernel"),
        (b"\x00" * 100, "too short"),
        (make_bzimage(b"", magic=0x12345678), "not a Linux kernel"),
        (make_bzimage(compress(tiny_elf(), "gzip"), version=0x0206), "boot protocol 2.06"),
        (make_bzimage(compress(tiny_elf(), "gzip"), xloadflags=0), "no 64-bit entry"),
        (make_bzimage(compress(tiny_elf(), "xz"))[:PROTECTED_MODE_OFFSET + 200], "truncated"),
        (make_bzimage(compress(tiny_elf(), "xz"))[:0x400], "truncated"),
    ],
)
def test_bad_kernels_are_refused_with_the_reason(data, message):
    with pytest.raises(KernelImageError, match=message):
        read_kernel(data)


def test_corrupt_payload_is_an_error_not_a_crash():
    payload = bytearray(compress(tiny_elf() * 4, "xz"))
    payload[40:60] = bytes(20)
    with pytest.raises(KernelImageError, match="xz payload is corrupt"):
        read_kernel(make_bzimage(bytes(payload)))


def test_hostile_jump_byte_cannot_reach_the_e820_table():
    image = bytearray(make_bzimage(compress(tiny_elf(), "gzip")))
    image[bzimage.JUMP_OFFSET + 1] = 0xFF
    header = read_kernel(bytes(image)).header
    assert bzimage.SETUP_SECTS_OFFSET + len(header.header_bytes) == bzimage.SETUP_HEADER_SLOT_END
