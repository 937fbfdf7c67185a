"""The AML encoder: byte by byte against the spec, and against ACPICA's iasl."""

import pytest

from mpvmm.x86 import aml
from mpvmm.x86.acpi import _table
from tests.x86 import iasl


# --- Encodings, by the spec (ACPI 6.5, chapters 6.4 and 20). ---

@pytest.mark.parametrize("length, encoded", [
    (0, b"\x01"), (62, b"\x3f"),  # one byte: a total up to 63
    (63, b"\x41\x04"), (4093, b"\x4f\xff"),  # two bytes: a total up to 2^12 - 1
    (4094, b"\x81\x00\x01"), (1048572, b"\x8f\xff\xff"),  # three: up to 2^20 - 1
    (1048573, b"\xc1\x00\x00\x01"),
])
def test_pkg_length_counts_its_own_bytes(length, encoded):
    assert aml.pkg_length(length) == encoded
    total = encoded[0] & 0x3F if len(encoded) == 1 else (encoded[0] & 0x0F) | int.from_bytes(encoded[1:], "little") << 4
    assert total == length + len(encoded)


def test_pkg_length_limit():
    with pytest.raises(aml.AmlError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integers_take_the_shortest_encoding(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integers_out_of_range(value):
    with pytest.raises(aml.AmlError):
        aml.integer(value)


def test_names_are_padded_and_prefixed():
    assert aml.name_string("COM1") == b"COM1"
    assert aml.name_string("KBD") == b"KBD_"
    assert aml.name_string("\\_SB") == b"\\_SB_"
    assert aml.name_string("\\_SB.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("^^A.B.C") == b"^^\x2f\x03A___B___C___"
    assert aml.name_string("\\") == b"\\\x00"


@pytest.mark.parametrize("bad", ["1ABC", "TOOLONG", "a", "A-B", ""])
def test_bad_name_segments(bad):
    with pytest.raises(aml.AmlError):
        aml.name_seg(bad)


def test_eisa_ids_compress_like_asl():
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"  # iasl: 0x0105D041
    assert aml.hardware_id("PNP0B00") == aml.eisa_id("PNP0B00")
    assert aml.hardware_id("LNRO0005") == b"\x0dLNRO0005\x00"  # an ACPI id stays a String
    with pytest.raises(aml.AmlError):
        aml.eisa_id("pnp0501")


def test_resource_descriptors():
    assert aml.io(0x3F8, 8) == bytes([0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x01, 0x08])
    assert aml.irq(4) == bytes([0x22, 0x10, 0x00])
    assert aml.irq(1, 12) == bytes([0x22, 0x02, 0x10])
    assert aml.memory32_fixed(0xD0000000, 0x200) == bytes([0x86, 9, 0, 1]) + (0xD0000000).to_bytes(4, "little") \
        + (0x200).to_bytes(4, "little")
    assert aml.interrupt(17) == bytes([0x89, 6, 0, 0x03, 1]) + (17).to_bytes(4, "little")
    assert aml.interrupt(5, edge=False, active_low=True, shared=True)[3] == 0x01 | 0x04 | 0x08
    assert aml.resource_template([aml.irq(4)]) == bytes([0x11, 0x08, 0x0A, 0x05, 0x22, 0x10, 0x00, 0x79, 0x00])


@pytest.mark.parametrize("make", [
    lambda: aml.irq(16), lambda: aml.irq(), lambda: aml.io(0x10000, 1), lambda: aml.io(0x60, 0),
    lambda: aml.memory32_fixed(0xFFFFF000, 0x2000), lambda: aml.interrupt(), lambda: aml.package(range(256)),
    lambda: aml.string("a\0b"), lambda: aml.data(True),
])
def test_what_cannot_be_encoded_is_refused(make):
    with pytest.raises(aml.AmlError):
        make()


# --- The reference toolchain: iasl reads back everything the encoder writes. ---

def _every_kind_of_term() -> bytes:
    """A DSDT body using every encoder function, with a package long enough for a 2-byte PkgLength."""
    virtio = aml.simple_device("VR00", "LNRO0005", 0, [aml.memory32_fixed(0xD0000000, 0x200), aml.interrupt(16)])
    uart = aml.simple_device("COM1", "PNP0501", 1, [aml.io(0x3F8, 8), aml.irq(4)])
    return aml.scope("\\_SB", [uart, virtio, aml.device("\\_SB.BOX", [aml.name("NUMS", aml.package(range(40)))])]) \
        + aml.name("\\STR", "mpvmm") + aml.name("\\BUF", aml.buffer(b"\x01\x02\x03")) \
        + aml.name("\\BIG", 1 << 40) + aml.name("\\_S5", aml.package([5, 0, 0, 0]))


def test_iasl_disassembles_every_kind_of_term(tmp_path):
    dsl = iasl.disassemble(_table(b"DSDT", 2, _every_kind_of_term()), str(tmp_path), "dsdt")
    assert 'Name (_HID, EisaId ("PNP0501")' in dsl
    assert 'Name (_HID, "LNRO0005")' in dsl
    assert "Memory32Fixed (ReadWrite,\n                    0xD0000000,         // Address Base\n" \
           "                    0x00000200,         // Address Length" in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                {\n" \
           "                    0x00000010,\n                }" in dsl
    assert "IRQNoFlags ()\n                    {4}" in dsl
    assert 'Name (\\STR, "mpvmm")' in dsl
    assert "Name (\\BIG, 0x0000010000000000)" in dsl
    assert "Device (\\_SB.BOX)" in dsl and "0x27" in dsl  # the 40th element of NUMS


def test_iasl_compiles_the_disassembly_back_to_our_bytes(tmp_path):
    """With iasl's optimizations off, the reference compiler writes exactly what we wrote."""
    body = _every_kind_of_term()
    dsl = iasl.disassemble(_table(b"DSDT", 2, body), str(tmp_path), "dsdt")
    recompiled = iasl.compile_asl(dsl, str(tmp_path), "dsdt")
    assert recompiled[iasl.HEADER_SIZE :] == body
