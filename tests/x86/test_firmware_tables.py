"""MP table, ACPI tables, e820 and the zero page, parsed back field by field."""

import struct

import pytest

from mpvmm.x86 import acpi, aml, bzimage, e820, layout, mptable, zeropage
from tests.x86 import iasl
from tests.x86.bzimage_fixtures import compress, make_bzimage, tiny_elf

GIB = 1 << 30


# --- MP table. ---

@pytest.mark.parametrize("cpus", [1, 2, 8, 254])
def test_mptable_checksums_and_processors(cpus):
    base = layout.LINUX_MPTABLE_ADDR
    table = mptable.build_mptable(base, cpus)
    floating = table[:16]
    assert floating[:4] == b"_MP_" and sum(floating) % 256 == 0
    assert struct.unpack_from("<I", floating, 4)[0] == base + 16
    assert floating[8] == 1 and floating[9] == 4
    config = table[16:]
    signature, length, revision = struct.unpack_from("<4sHB", config)
    assert (signature, length, revision) == (b"PCMP", len(config), 4)
    assert sum(config) % 256 == 0
    count, lapic = struct.unpack_from("<HI", config, 34)
    assert lapic == layout.LAPIC_ADDR
    offset, processors, io_irqs, local = 44, [], {}, []
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    for _ in range(count):
        kind = config[offset]
        if kind == 0:
            processors.append((config[offset + 1], config[offset + 3]))
        elif kind == 2:
            assert config[offset + 1] == cpus  # the IOAPIC's id follows the CPUs'
            assert struct.unpack_from("<I", config, offset + 4)[0] == layout.IOAPIC_ADDR
        elif kind == 3:
            io_irqs[config[offset + 5]] = config[offset + 7]
        elif kind == 4:
            local.append((config[offset + 1], config[offset + 6], config[offset + 7]))
        offset += sizes[kind]
    assert offset == len(config)
    assert processors == [(0, 3)] + [(i, 1) for i in range(1, cpus)]  # BSP flag on vCPU 0 only
    assert io_irqs == {irq: irq for irq in range(16)}  # ISA IRQ n -> pin n, KVM's routing
    assert local == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT -> BSP LINT0, NMI -> every LINT1
    # The scan region Linux searches holds the whole table, and it stays below the ACPI tables.
    assert base + len(table) < layout.LINUX_ACPI_ADDR


@pytest.mark.parametrize("cpus", [0, 255])
def test_mptable_refuses_cpu_counts_it_cannot_describe(cpus):
    with pytest.raises(ValueError):
        mptable.build_mptable(layout.LINUX_MPTABLE_ADDR, cpus)


# --- ACPI. ---

def _tables(cpus):
    base = layout.LINUX_ACPI_ADDR
    rsdp_address, blob = acpi.build_acpi(base, cpus)

    def at(address, length):
        return blob[address - base : address - base + length]

    return rsdp_address, blob, at


def _header(table):
    signature, length, revision, checksum = struct.unpack_from("<4sIBB", table)
    assert len(table) == length
    assert sum(table) % 256 == 0, f"{signature} checksum"
    return signature, revision


@pytest.mark.parametrize("cpus", [1, 2, 64, 255])
def test_acpi_tables_parse_back(cpus):
    rsdp_address, blob, at = _tables(cpus)
    assert len(blob) <= layout.LINUX_ACPI_MAX
    rsdp = at(rsdp_address, 36)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt_length = struct.unpack_from("<I", at(xsdt_address, 8), 4)[0]
    xsdt = at(xsdt_address, xsdt_length)
    assert _header(xsdt)[0] == b"XSDT"
    pointers = struct.unpack_from(f"<{(xsdt_length - 36) // 8}Q", xsdt, 36)
    tables = {}
    for pointer in pointers:
        length = struct.unpack_from("<I", at(pointer, 8), 4)[0]
        table = at(pointer, length)
        tables[_header(table)[0]] = table
    assert set(tables) == {b"FACP", b"APIC"}

    fadt = tables[b"FACP"]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & acpi.FLAG_HW_REDUCED_ACPI and flags & acpi.FLAG_RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] & acpi.IAPC_8042
    sleep_control = struct.unpack_from("<BBBBQ", fadt, 244)
    sleep_status = struct.unpack_from("<BBBBQ", fadt, 256)
    reset = struct.unpack_from("<BBBBQ", fadt, 116)
    assert sleep_control == (1, 8, 0, 1, layout.ACPI_PM_PORT)
    assert sleep_status[0] == 1 and sleep_status[4] == layout.ACPI_PM_PORT + 1
    assert reset[4] == layout.ACPI_PM_PORT + 2 and fadt[128] == 1
    dsdt_address = struct.unpack_from("<Q", fadt, 140)[0]
    assert struct.unpack_from("<I", fadt, 40)[0] == dsdt_address
    dsdt_length = struct.unpack_from("<I", at(dsdt_address, 8), 4)[0]
    dsdt = at(dsdt_address, dsdt_length)
    assert _header(dsdt) == (b"DSDT", acpi.DSDT_REVISION)
    # Name(\_S5, Package(){5, 0, 0, 0}) ends it: SLP_TYP 5 is what the device model expects.
    assert dsdt.endswith(bytes([0x08]) + b"\\_S5_" + bytes([0x12, 0x07, 0x04, 0x0A, 0x05, 0, 0, 0]))

    madt = tables[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 1)
    offset, lapics, ioapics, nmis, others = 44, [], [], [], []
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        if kind == 0:
            assert length == 8
            uid, apic_id, flags = struct.unpack_from("<BBI", madt, offset + 2)
            lapics.append((uid, apic_id, flags))
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BBII", madt, offset + 2))
        elif kind == 4:
            nmis.append(struct.unpack_from("<BHB", madt, offset + 2))
        else:
            others.append(kind)
        offset += length
    assert offset == len(madt)
    assert lapics == [(i, i, 1) for i in range(cpus)]  # APIC id = vCPU index, as KVM sets it
    assert ioapics == [(cpus, 0, layout.IOAPIC_ADDR, 0)]
    assert nmis == [(0xFF, 5, 1)]
    assert others == []  # no interrupt source override: KVM's GSI n is pin n


def test_acpi_refuses_more_cpus_than_xapic_ids():
    with pytest.raises(ValueError):
        acpi.build_acpi(layout.LINUX_ACPI_ADDR, 256)


# --- ACPI, read by the reference toolchain (ACPICA's iasl). ---

def _table_at(blob, address, base=layout.LINUX_ACPI_ADDR):
    length = struct.unpack_from("<I", blob, address - base + 4)[0]
    return blob[address - base : address - base + length]


def _tables_by_signature(cpus, devices=()):
    rsdp_address, blob = acpi.build_acpi(layout.LINUX_ACPI_ADDR, cpus, devices)
    xsdt = _table_at(blob, struct.unpack_from("<Q", blob, rsdp_address - layout.LINUX_ACPI_ADDR + 24)[0])
    tables = {b"XSDT": xsdt}
    for pointer in struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36):
        table = _table_at(blob, pointer)
        tables[table[:4]] = table
    fadt = tables[b"FACP"]
    tables[b"DSDT"] = _table_at(blob, struct.unpack_from("<Q", fadt, acpi.FADT_X_DSDT_OFFSET)[0])
    return tables


def _device_block(dsl, name):
    """The text of ``Device (name) { ... }`` in a disassembled DSDT."""
    start = dsl.index(f"Device ({name})")
    end = dsl.find("Device (", start + 1)
    return dsl[start : end if end != -1 else len(dsl)]


def _io(base, length):
    return (f"IO (Decode16,\n                    0x{base:04X},             // Range Minimum\n"
            f"                    0x{base:04X},             // Range Maximum\n"
            f"                    0x01,               // Alignment\n"
            f"                    0x{length:02X},               // Length")


def test_iasl_reads_every_pc_device_in_the_dsdt(tmp_path):
    dsl = iasl.disassemble(_tables_by_signature(2)[b"DSDT"], str(tmp_path), "dsdt")
    com1 = _device_block(dsl, "COM1")
    assert 'EisaId ("PNP0501")' in com1 and "Name (_UID, One)" in com1
    assert _io(layout.COM1_PORT, layout.COM1_PORT_COUNT) in com1
    assert f"IRQNoFlags ()\n                    {{{layout.COM1_IRQ}}}" in com1
    keyboard = _device_block(dsl, "KBD")
    assert 'EisaId ("PNP0303")' in keyboard
    assert _io(layout.I8042_DATA_PORT, 1) in keyboard and _io(layout.I8042_COMMAND_PORT, 1) in keyboard
    assert f"IRQNoFlags ()\n                    {{{layout.I8042_IRQ}}}" in keyboard
    assert "PNP0F13" not in dsl  # no AUX (mouse) port: the device model has none
    rtc = _device_block(dsl, "RTC")
    assert 'EisaId ("PNP0B00")' in rtc and _io(layout.RTC_PORT, layout.RTC_PORT_COUNT) in rtc
    assert f"IRQNoFlags ()\n                    {{{layout.RTC_IRQ}}}" in rtc
    pm = _device_block(dsl, "PMRG")
    assert 'EisaId ("PNP0C02")' in pm and _io(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT) in pm
    assert "Scope (\\_SB)" in dsl
    assert "Name (\\_S5, Package (0x04)" in dsl and "0x05," in dsl.split("Name (\\_S5")[1]


def test_iasl_compiles_our_dsdt_back_to_the_same_aml(tmp_path):
    dsdt = _tables_by_signature(2)[b"DSDT"]
    recompiled = iasl.compile_asl(iasl.disassemble(dsdt, str(tmp_path), "dsdt"), str(tmp_path), "dsdt")
    assert recompiled[iasl.HEADER_SIZE :] == dsdt[iasl.HEADER_SIZE :]


def test_iasl_reads_a_device_added_to_the_dsdt(tmp_path):
    """How the virtio-mmio devices will join: one aml.simple_device term each."""
    virtio = aml.simple_device("VR00", "LNRO0005", 0, [aml.memory32_fixed(0xD0000000, 0x200), aml.interrupt(16)])
    dsl = iasl.disassemble(_tables_by_signature(1, [virtio])[b"DSDT"], str(tmp_path), "dsdt")
    block = _device_block(dsl, "VR00")
    assert 'Name (_HID, "LNRO0005")' in block and "0xD0000000," in block and "0x00000010," in block
    assert dsl.index("Device (VR00)") < dsl.index("Name (\\_S5")  # inside \_SB with the others


def test_iasl_reads_the_fadt_as_hardware_reduced_with_our_registers(tmp_path):
    tables = _tables_by_signature(2)
    dsl = iasl.disassemble(tables[b"FACP"], str(tmp_path), "facp")
    assert iasl.field(dsl, "Revision") == "06" and iasl.field(dsl, "FADT Minor Revision") == "05"
    assert iasl.flag(dsl, "Hardware Reduced (V5)") == 1
    assert iasl.flag(dsl, "Reset Register Supported (V2)") == 1
    assert iasl.flag(dsl, "8042 Present on ports 60/64 (V2)") == 1
    assert iasl.flag(dsl, "Legacy Devices Supported (V2)") == 1
    assert iasl.flag(dsl, "CMOS RTC Not Present (V5)") == 0
    assert iasl.field(dsl, "RTC Century Index") == f"{acpi.RTC_CENTURY_REGISTER:02X}"
    assert iasl.field(dsl, "SCI Interrupt") == "0000"  # reduced hardware: no SCI
    assert iasl.field(dsl, "PM1A Event Block Address") == "00000000"
    assert iasl.field(dsl, "PM Timer Block Address") == "00000000"
    assert iasl.field(dsl, "Value to cause reset") == f"{acpi.RESET_VALUE:02X}"
    dsdt_address = struct.unpack_from("<Q", tables[b"FACP"], acpi.FADT_X_DSDT_OFFSET)[0]
    assert iasl.fields(dsl, "DSDT Address") == [f"{dsdt_address:08X}", f"{dsdt_address:016X}"]
    # The generic address structures in table order: the reset register first, sleep control and status last.
    addresses = [int(value, 16) for value in iasl.fields(dsl, "Address") if len(value) == 16]
    assert addresses[0] == acpi.RESET_PORT
    assert addresses[-2:] == [acpi.SLEEP_CONTROL_PORT, acpi.SLEEP_STATUS_PORT]
    assert iasl.fields(dsl, "Space ID").count("01 [SystemIO]") == 3


@pytest.mark.parametrize("cpus", [1, 4])
def test_iasl_reads_the_madt_and_xsdt(tmp_path, cpus):
    tables = _tables_by_signature(cpus)
    dsl = iasl.disassemble(tables[b"APIC"], str(tmp_path), "apic")
    assert iasl.field(dsl, "Local Apic Address") == f"{layout.LAPIC_ADDR:08X}"
    assert iasl.flag(dsl, "PC-AT Compatibility") == 1
    assert dsl.count("Subtable Type : 00 [Processor Local APIC]") == cpus
    assert iasl.field(dsl, "I/O Apic ID") == f"{cpus:02X}"
    assert "Subtable Type : 02" not in dsl  # no interrupt source override
    assert dsl.count("Subtable Type : 04 [Local APIC NMI]") == 1
    xsdt = iasl.disassemble(tables[b"XSDT"], str(tmp_path), "xsdt")
    assert xsdt.count("ACPI Table Address") == 2


# --- e820 and the zero page. ---

def test_e820_keeps_base_memory_and_reserves_the_bios_area():
    entries = e820.memory_map([(0, 256 << 20)])
    assert entries == [
        (0, 0x9FC00, e820.E820_RAM),
        (0x9FC00, 0x100000 - 0x9FC00, e820.E820_RESERVED),
        (0x100000, (256 << 20) - 0x100000, e820.E820_RAM),
    ]


def test_e820_splits_around_the_mmio_hole():
    entries = e820.memory_map([(0, 3 * GIB), (4 * GIB, GIB)])
    assert entries[-1] == (4 * GIB, GIB, e820.E820_RAM)
    assert entries[-2] == (0x100000, 3 * GIB - 0x100000, e820.E820_RAM)


def test_e820_needs_memory_past_1mib():
    with pytest.raises(ValueError):
        e820.memory_map([(0, 0x80000)])


def _u(page, offset, fmt):
    return struct.unpack_from("<" + fmt, page, offset)[0]


def test_zero_page_from_a_bzimage_header():
    header = bzimage.read_kernel(make_bzimage(compress(tiny_elf(), "gzip"))).header
    memory_map = e820.memory_map([(0, 5 * GIB // 2)])
    page = zeropage.build_zero_page(header, memory_map, 0x20000, (0x7F000000, 0x123456), 0xE0000)
    assert len(page) == 4096
    assert page[0x1F1:0x210] == header.header_bytes[: 0x210 - 0x1F1]  # copied up to type_of_loader
    assert page[0x230:0x26C] == header.header_bytes[0x230 - 0x1F1 :]
    assert _u(page, 0x202, "I") == bzimage.HEADER_MAGIC and _u(page, 0x206, "H") == 0x020F
    assert page[0x210] == 0xFF  # type_of_loader: non-zero, or the initrd is ignored
    assert _u(page, 0x228, "I") == 0x20000 and _u(page, 0xC8, "I") == 0
    assert (_u(page, 0x218, "I"), _u(page, 0x21C, "I")) == (0x7F000000, 0x123456)
    assert _u(page, 0x70, "Q") == 0xE0000
    assert page[0x1E8] == 3 and page[0x1EF] == 0
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(3)]
    assert table == [tuple(entry) for entry in memory_map]
    assert _u(page, 0x236, "H") == 0x7F  # xloadflags copied from the image


def test_zero_page_for_a_vmlinux_builds_the_header():
    page = zeropage.build_zero_page(None, e820.memory_map([(0, 64 << 20)]), 0x20000, None, 0)
    assert _u(page, 0x1FE, "H") == 0xAA55 and _u(page, 0x202, "I") == bzimage.HEADER_MAGIC
    assert _u(page, 0x230, "I") != 0  # kernel_alignment must not be 0
    assert _u(page, 0x238, "I") == 2047
    assert (_u(page, 0x218, "I"), _u(page, 0x21C, "I")) == (0, 0)


def test_zero_page_high_initrd_uses_the_ext_fields():
    page = zeropage.build_zero_page(None, e820.memory_map([(0, 64 << 20)]), 0x1_2000_0000,
                                    (0x1_4000_0000, 0x1_0000_0010), 0)
    assert (_u(page, 0x218, "I"), _u(page, 0xC0, "I")) == (0x4000_0000, 1)
    assert (_u(page, 0x21C, "I"), _u(page, 0xC4, "I")) == (0x10, 1)
    assert (_u(page, 0x228, "I"), _u(page, 0xC8, "I")) == (0x2000_0000, 1)
