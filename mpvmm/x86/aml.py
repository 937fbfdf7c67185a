"""A small ACPI Machine Language encoder: the terms a DSDT of plain devices needs.

Each function returns the encoded bytes of one AML term (ACPI 6.5, chapter
20, "ACPI Machine Language Specification"), so terms nest by passing bytes:

    device("COM1", [
        name("_HID", eisa_id("PNP0501")),
        name("_UID", 1),
        name("_CRS", resource_template([io(0x3F8, 8), irq(4)])),
    ])

``name`` and ``package`` also take plain ``int`` and ``str`` values (an
Integer, a String). Resource descriptors (chapter 6.4) are encoded by
``io``, ``irq``, ``interrupt`` (for GSIs above 15) and ``memory32_fixed``;
``resource_template`` wraps them in a Buffer with its end tag, as ASL's
``ResourceTemplate () {...}`` does. The tests disassemble what this writes
with ACPICA's ``iasl -d``.
"""

from __future__ import annotations

import re
import struct
from typing import Iterable, Union

# --- Opcodes (ACPI 6.5, 20.3). ---
ZERO_OP, ONE_OP = 0x00, 0x01
NAME_OP = 0x08
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX = b"\\", b"^"
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x2E, 0x2F

# --- Resource descriptors (ACPI 6.5, 6.4). Small items: tag byte = name << 3 | length. ---
SMALL_IRQ = 0x04
SMALL_IO = 0x08
SMALL_END_TAG = 0x0F
LARGE_MEMORY32_FIXED = 0x86
LARGE_EXTENDED_INTERRUPT = 0x89
IO_DECODE_16 = 0x01  # the device decodes all 16 address bits
MEMORY_READ_WRITE = 0x01
# Extended interrupt flags: consumer, edge-triggered; active high and exclusive are 0.
INTERRUPT_CONSUMER, INTERRUPT_EDGE, INTERRUPT_ACTIVE_LOW, INTERRUPT_SHARED = 0x01, 0x02, 0x04, 0x08
ISA_IRQ_COUNT = 16  # what the IRQ descriptor's 16-bit mask can name

NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")

Value = Union[int, str, bytes]


class AmlError(ValueError):
    """A name, number or descriptor AML cannot encode."""


# --- Names. ---

def name_seg(text: str) -> bytes:
    """A 4-character name segment; shorter names are padded with ``_`` as ASL does."""
    if not NAME_SEG.fullmatch(text):
        raise AmlError(f"{text!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _, not starting with a digit)")
    return text.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """``COM1``, ``\\_SB_.COM1``, ``^PCI0``: a NameString with its root or parent prefix."""
    if path.startswith("\\"):
        prefix, path = ROOT_CHAR, path[1:]
    else:
        stripped = path.lstrip("^")
        prefix, path = PARENT_PREFIX * (len(path) - len(stripped)), stripped
    segments = [name_seg(part) for part in path.split(".")] if path else []
    if not segments:
        return prefix + bytes([ZERO_OP])  # NullName
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    if len(segments) > 255:
        raise AmlError(f"{path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


# --- Data objects. ---

def pkg_length(content_length: int) -> bytes:
    """The PkgLength encoding: it counts its own 1-4 bytes plus ``content_length``."""
    if content_length + 1 < 0x40:
        return bytes([content_length + 1])
    for extra in (1, 2, 3):
        total = content_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"{content_length} bytes do not fit a PkgLength (at most 2^28 - 1)")


def integer(value: int) -> bytes:
    """The shortest Integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWordConst)."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"{value} is not a 64-bit unsigned integer")
    if value in (0, 1):
        return bytes([ZERO_OP if value == 0 else ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32), (QWORD_PREFIX, "<Q", 1 << 64)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\0" in data:
        raise AmlError("an AML String cannot hold NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


def eisa_id(text: str) -> bytes:
    """ASL's EisaId("PNP0501"): three letters in 5 bits each and four hex digits, as a DWord."""
    if not EISA_ID.fullmatch(text):
        raise AmlError(f"{text!r} is not an EISA id (three capitals and four hex digits)")
    vendor = sum((ord(ch) - 0x40) << shift for ch, shift in zip(text[:3], (10, 5, 0)))
    encoded = struct.pack(">HH", vendor, int(text[3:], 16))
    return integer(int.from_bytes(encoded, "little"))


def hardware_id(text: str) -> bytes:
    """A _HID: an EISA id as its compressed integer, any other (ACPI "LNRO0005") as a String."""
    return eisa_id(text) if EISA_ID.fullmatch(text) else string(text)


def data(value: Value) -> bytes:
    """``int`` -> Integer, ``str`` -> String, ``bytes`` -> taken as an encoded term."""
    if isinstance(value, bool):
        raise AmlError("use an int, not a bool")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    return bytes(value)


def buffer(contents: bytes) -> bytes:
    body = integer(len(contents)) + contents
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(elements: Iterable[Value]) -> bytes:
    encoded = [data(element) for element in elements]
    if len(encoded) > 255:
        raise AmlError("a Package holds at most 255 elements")
    body = bytes([len(encoded)]) + b"".join(encoded)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# --- Named objects and scopes. ---

def name(path: str, value: Value) -> bytes:
    """ASL's Name (path, value)."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, terms: Iterable[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, terms: Iterable[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def simple_device(path: str, hid: str, uid: int, resources: Iterable[bytes]) -> bytes:
    """A device with a _HID, a _UID and a _CRS of ``resources``: all our devices are this."""
    return device(path, [name("_HID", hardware_id(hid)), name("_UID", uid),
                         name("_CRS", resource_template(resources))])


# --- Resource descriptors. ---

def io(base: int, length: int, alignment: int = 1) -> bytes:
    """ASL's IO (Decode16, base, base, alignment, length): a fixed I/O port range."""
    if not (0 <= base <= 0xFFFF and 1 <= length <= 0xFF and 0 <= alignment <= 0xFF):
        raise AmlError(f"I/O range {base:#x}+{length} does not fit an IO descriptor")
    return struct.pack("<BBHHBB", SMALL_IO << 3 | 7, IO_DECODE_16, base, base, alignment, length)


def irq(*irqs: int) -> bytes:
    """ASL's IRQNoFlags () {irqs}: ISA IRQs, edge-triggered, active high, exclusive."""
    if not irqs or any(not 0 <= number < ISA_IRQ_COUNT for number in irqs):
        raise AmlError(f"an IRQ descriptor names ISA IRQs 0-15, not {irqs}")
    mask = sum(1 << number for number in set(irqs))
    return struct.pack("<BH", SMALL_IRQ << 3 | 2, mask)


def interrupt(*gsis: int, edge: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """ASL's Interrupt (ResourceConsumer, ...) {gsis}: any GSI, e.g. IOAPIC pins 16-23."""
    if not 1 <= len(gsis) <= 255 or any(not 0 <= gsi < 1 << 32 for gsi in gsis):
        raise AmlError(f"an extended interrupt descriptor holds 1-255 32-bit GSIs, not {gsis}")
    flags = (INTERRUPT_CONSUMER | (INTERRUPT_EDGE if edge else 0) | (INTERRUPT_ACTIVE_LOW if active_low else 0)
             | (INTERRUPT_SHARED if shared else 0))
    body = struct.pack(f"<BB{len(gsis)}I", flags, len(gsis), *gsis)
    return struct.pack("<BH", LARGE_EXTENDED_INTERRUPT, len(body)) + body


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """ASL's Memory32Fixed (ReadWrite, base, length)."""
    if not (0 <= base < 1 << 32 and 0 < length < 1 << 32 and base + length <= 1 << 32):
        raise AmlError(f"memory range {base:#x}+{length:#x} does not fit a Memory32Fixed descriptor")
    body = struct.pack("<BII", MEMORY_READ_WRITE if writable else 0, base, length)
    return struct.pack("<BH", LARGE_MEMORY32_FIXED, len(body)) + body


def resource_template(descriptors: Iterable[bytes]) -> bytes:
    """The descriptors and an end tag (checksum 0: "treat as correct"), in a Buffer."""
    end_tag = bytes([SMALL_END_TAG << 3 | 1, 0])
    return buffer(b"".join(descriptors) + end_tag)
