"""Reading a Linux kernel image: a bzImage's setup header and payload, or a vmlinux ELF.

Like rust-vmm linux-loader's ``BzImage``: the header is checked ("HdrS", the
boot protocol version, XLF_KERNEL_64) with explicit bounds before anything is
trusted. The compressed payload inside a bzImage is decompressed here, on the
host, so that the guest never runs its own decompressor: under the emulated
ring 0 of these machines that alone takes minutes (docs/design.md, "PVM hosts").
Documentation/arch/x86/boot.rst gives the offsets; docs/linux.md the facts used.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass

from mpvmm.errors import GuestLoadError

# --- Setup header fields: offsets from the start of the file (= in boot_params). ---
SETUP_SECTS_OFFSET = 0x1F1  # u8: 512-byte sectors of real-mode setup; 0 means 4
BOOT_FLAG_OFFSET = 0x1FE  # u16: 0xAA55
JUMP_OFFSET = 0x200  # "EB xx": the header ends at 0x202 + xx
HEADER_MAGIC_OFFSET = 0x202  # u32: "HdrS"
VERSION_OFFSET = 0x206  # u16: boot protocol version
LOADFLAGS_OFFSET = 0x211  # u8
KERNEL_ALIGNMENT_OFFSET = 0x230  # u32
RELOCATABLE_OFFSET = 0x234  # u8
XLOADFLAGS_OFFSET = 0x236  # u16
CMDLINE_SIZE_OFFSET = 0x238  # u32: longest command line, without the NUL
PAYLOAD_OFFSET_OFFSET = 0x248  # u32: from the protected-mode part
PAYLOAD_LENGTH_OFFSET = 0x24C  # u32
INITRD_ADDR_MAX_OFFSET = 0x22C  # u32: highest byte the initrd may occupy
PREF_ADDRESS_OFFSET = 0x258  # u64
INIT_SIZE_OFFSET = 0x260  # u32: bytes the kernel needs from its load address

BOOT_FLAG = 0xAA55
HEADER_MAGIC = 0x53726448  # "HdrS"
# 2.12 brings xloadflags (64-bit entry), the first version a 64-bit-only
# loader can trust; Firecracker refuses older ones too.
MIN_BOOT_PROTOCOL = 0x020C
XLF_KERNEL_64 = 1 << 0  # the kernel has the 64-bit entry at load address + 0x200
LOADED_HIGH = 1 << 0  # loadflags: the protected-mode part loads at 0x100000
STARTUP_64_OFFSET = 0x200  # the decompressor's startup_64 from the load address
DEFAULT_SETUP_SECTS = 4
SECTOR_SIZE = 512
# The end of the setup header is the jump's target; this much is always there.
MIN_HEADER_END = 0x26C
SETUP_HEADER_SLOT_END = 0x290  # boot_params.edd_mbr_sig_buffer follows the header

ELF_MAGIC = b"\x7fELF"
_LZ4_LEGACY_MAGIC = 0x184C2102

# Payload formats by magic (docs/linux.md, "Kernel images").
_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x42\x5a\x68", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
)


class KernelImageError(GuestLoadError):
    """The kernel file is not a bzImage or vmlinux mpvmm can boot."""


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header a 64-bit loader needs."""

    version: int
    setup_sects: int
    loadflags: int
    xloadflags: int
    kernel_alignment: int
    relocatable: bool
    cmdline_size: int
    initrd_addr_max: int
    pref_address: int
    init_size: int
    payload_offset: int
    payload_length: int
    header_bytes: bytes  # file bytes 0x1F1 .. end of header, copied into boot_params

    @property
    def protected_mode_offset(self) -> int:
        """Where the protected-mode kernel (the decompressor) starts in the file."""
        return ((self.setup_sects or DEFAULT_SETUP_SECTS) + 1) * SECTOR_SIZE


@dataclass(frozen=True)
class KernelImage:
    """What a kernel file turned out to be.

    ``vmlinux`` holds the ELF to load (from the file itself or decompressed
    from a bzImage's payload); it is None when a bzImage's payload format is
    unknown and the bzImage's own 64-bit entry must be used instead, with
    ``protected_mode`` as the code to load.
    """

    kind: str  # "vmlinux", "bzimage+<format>" or "bzimage"
    header: SetupHeader | None
    vmlinux: bytes | None
    protected_mode: bytes | None = None


def _u(data: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, data, offset)[0]


def parse_setup_header(data: bytes, what: str = "kernel") -> SetupHeader:
    """Check and read a bzImage's setup header; KernelImageError if it is not one."""
    if len(data) < MIN_HEADER_END + 1:
        raise KernelImageError(f"{what} is too short to be a bzImage ({len(data)} bytes)")
    if _u(data, BOOT_FLAG_OFFSET, "H") != BOOT_FLAG or _u(data, HEADER_MAGIC_OFFSET, "I") != HEADER_MAGIC:
        raise KernelImageError(f"{what} is not a Linux kernel (no bzImage header and not an ELF file)")
    version = _u(data, VERSION_OFFSET, "H")
    if version < MIN_BOOT_PROTOCOL:
        raise KernelImageError(
            f"{what} uses boot protocol {version >> 8}.{version & 0xFF:02d}; "
            f"mpvmm needs {MIN_BOOT_PROTOCOL >> 8}.{MIN_BOOT_PROTOCOL & 0xFF:02d} or later (Linux 3.8+)"
        )
    xloadflags = _u(data, XLOADFLAGS_OFFSET, "H")
    if not xloadflags & XLF_KERNEL_64:
        raise KernelImageError(f"{what} has no 64-bit entry point (a 32-bit kernel?)")
    # Clamped to where boot_params' header slot ends, so a hostile jump
    # byte cannot make us copy over the e820 table.
    header_end = min(HEADER_MAGIC_OFFSET + data[JUMP_OFFSET + 1], SETUP_HEADER_SLOT_END)
    header = SetupHeader(
        version=version,
        setup_sects=data[SETUP_SECTS_OFFSET],
        loadflags=data[LOADFLAGS_OFFSET],
        xloadflags=xloadflags,
        kernel_alignment=_u(data, KERNEL_ALIGNMENT_OFFSET, "I"),
        relocatable=bool(data[RELOCATABLE_OFFSET]),
        cmdline_size=_u(data, CMDLINE_SIZE_OFFSET, "I"),
        initrd_addr_max=_u(data, INITRD_ADDR_MAX_OFFSET, "I"),
        pref_address=_u(data, PREF_ADDRESS_OFFSET, "Q"),
        init_size=_u(data, INIT_SIZE_OFFSET, "I"),
        payload_offset=_u(data, PAYLOAD_OFFSET_OFFSET, "I"),
        payload_length=_u(data, PAYLOAD_LENGTH_OFFSET, "I"),
        header_bytes=bytes(data[SETUP_SECTS_OFFSET:header_end]),
    )
    if header.protected_mode_offset >= len(data):
        raise KernelImageError(f"{what} is truncated: its setup code runs past the end of the file")
    return header


def payload_format(payload: bytes) -> str | None:
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return None


def _lz4_legacy(payload: bytes) -> bytes:
    """The kernel's LZ4 is the legacy frame: a magic, then blocks of u32 size + data.

    The legacy format caps a block's output at 8 MiB; the stream ends at the
    end of the data or where the 4-byte uncompressed size the kernel's build
    appends would be read as a block size.
    """
    import lz4.block

    out = bytearray()
    position = 4
    end = len(payload) - 4  # the trailing uncompressed size is not a block
    while position + 4 <= end:
        size = _u(payload, position, "I")
        position += 4
        if size == _LZ4_LEGACY_MAGIC:  # concatenated frames: a new one starts
            continue
        if size == 0 or position + size > end:
            raise ValueError(f"LZ4 block of {size} bytes at {position - 4} runs past the payload")
        out += lz4.block.decompress(payload[position : position + size], uncompressed_size=8 << 20)
        position += size
    return bytes(out)


def _zstd(payload: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(payload)


def decompress_payload(payload: bytes, fmt: str) -> bytes:
    """Decompress a bzImage payload; raises KernelImageError on corrupt data."""
    try:
        if fmt == "gzip":
            # The kernel appends its own 4-byte size after the gzip stream.
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if fmt == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        if fmt == "lzma":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
        if fmt == "bzip2":
            import bz2

            return bz2.BZ2Decompressor().decompress(payload)
        if fmt == "lz4":
            return _lz4_legacy(payload)
        if fmt == "zstd":
            return _zstd(payload)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as err:
        raise KernelImageError(f"the kernel's {fmt} payload is corrupt: {err}") from err
    except Exception as err:  # lz4 and zstandard raise their own error types
        raise KernelImageError(f"the kernel's {fmt} payload is corrupt: {err}") from err
    raise KernelImageError(f"unknown payload format {fmt!r}")


def read_kernel(data: bytes, what: str = "kernel") -> KernelImage:
    """Classify and unpack a kernel file: a vmlinux ELF or a bzImage."""
    if not data:
        raise KernelImageError(f"{what} is empty")
    if data.startswith(ELF_MAGIC):
        return KernelImage("vmlinux", None, data)
    header = parse_setup_header(data, what)
    protected_mode = data[header.protected_mode_offset :]
    start, length = header.payload_offset, header.payload_length
    fmt = None
    if length and start + length <= len(protected_mode):
        payload = protected_mode[start : start + length]
        fmt = payload_format(payload)
    elif length:
        raise KernelImageError(f"{what} is truncated: its payload runs past the end of the file")
    if fmt is not None:
        vmlinux = decompress_payload(payload, fmt)
        if vmlinux.startswith(ELF_MAGIC):
            return KernelImage(f"bzimage+{fmt}", header, vmlinux)
    # Unknown format, or a payload that is not an ELF: let the kernel's own
    # decompressor do it from the 64-bit entry.
    return KernelImage("bzimage", header, None, protected_mode)
