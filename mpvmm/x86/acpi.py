"""ACPI tables: RSDP, XSDT, a hardware-reduced FADT, the MADT, and a DSDT of the PC devices.

The FADT is hardware-reduced (HW_REDUCED_ACPI), like Firecracker's and
Cloud Hypervisor's: no SCI, no PM1 event/control blocks, no PM timer, no
FACS. Power-off uses the sleep control register (the DSDT's \\_S5 package
gives SLP_TYP 5, so Linux writes ``(5 << 2) | SLP_EN`` there) and reboot the
reset register, both in the device model's ACPI PM block
(devicemodel/acpi_pm.py).

On reduced hardware Linux has no legacy PIC (``acpi_generic_reduced_hw_init``
installs the null PIC), so it pre-maps no ISA IRQ ("preallocated irqs: 0"):
a device's IRQ reaches the IOAPIC only if the DSDT describes the device and
names it in _CRS. So the DSDT lists every device the device model emulates
under ``\\_SB_``: COM1 (PNP0501), the i8042 keyboard controller (PNP0303; no
AUX port, which the device model does not emulate, so no PNP0F13), the CMOS
RTC (PNP0B00) and the PM registers (PNP0C02, a motherboard resource that
reserves their ports). Linux's PNP layer binds 8250_pnp, i8042 and rtc_cmos
to them and maps each IRQ as an edge-triggered, active-high IOAPIC pin,
which is what the device model's irqfd pulses give. ``build_acpi`` takes more
devices (``aml.simple_device(...)`` terms) for the DSDT: ``virtio_devices``
describes virtio-mmio windows as Linux's virtio_mmio driver finds them
(``LNRO0005``, a Memory32Fixed window and an edge-triggered, active-high
Interrupt on the device's GSI, as Firecracker and QEMU's microvm do): Debian's
kernels take no virtio-mmio devices from the command line.

The MADT lists every vCPU's local APIC (Debian's cloud kernel has no
MP-table parser) and the IOAPIC with no interrupt source override: KVM routes
GSI n to pin n, the PIT on pin 0.
"""

from __future__ import annotations

import struct

from typing import Iterable

from mpvmm.x86 import aml, layout
from mpvmm.x86.mptable import checksum_byte, ioapic_id

OEM_ID = b"MPVMM "
OEM_TABLE_ID = b"MPVMMVM "
OEM_REVISION = 1
CREATOR_ID = b"MPVM"
CREATOR_REVISION = 1
HEADER_SIZE = 36
RSDP_SIZE = 36
RSDP_V1_SIZE = 20

# --- FADT (ACPI 6.5 layout, 276 bytes). ---
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276
FADT_DSDT_OFFSET = 40
FADT_SCI_INT_OFFSET = 46
FADT_CENTURY_OFFSET = 108
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG_OFFSET = 116
FADT_RESET_VALUE_OFFSET = 128
FADT_MINOR_REVISION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_SLEEP_CONTROL_OFFSET = 244
FADT_SLEEP_STATUS_OFFSET = 256
FADT_HYPERVISOR_ID_OFFSET = 268
IAPC_LEGACY_DEVICES = 1 << 0  # ISA devices (our COM1, i8042, RTC) are there
IAPC_8042 = 1 << 1  # an i8042 exists (clear: Linux treats it as absent)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_BOOT_ARCH = IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
SCI_IRQ = 0  # reduced hardware has no SCI
RTC_CENTURY_REGISTER = 0x32  # the CMOS byte holding the century (devicemodel/rtc.py)
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1

# The device model's ACPI PM block at layout.ACPI_PM_PORT: one byte each.
SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = 1
RESET_OFFSET = 2
SLEEP_CONTROL_PORT = layout.ACPI_PM_PORT + SLEEP_CONTROL_OFFSET
SLEEP_STATUS_PORT = layout.ACPI_PM_PORT + SLEEP_STATUS_OFFSET
RESET_PORT = layout.ACPI_PM_PORT + RESET_OFFSET
RESET_VALUE = 1
# Sleep control: SLP_TYP in bits 4:2, SLP_EN bit 5 (ACPI 6.5, 4.8.3.7).
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7
SLP_EN = 0x20
SLEEP_TYPE_S5 = 5  # \_S5's SLP_TYP; sleep control gets (5 << 2) | SLP_EN
# Sleep status: WAK_STS bit 7, write 1 to clear (ACPI 6.5, 4.8.3.8).
WAK_STS = 0x80

# --- MADT. ---
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1  # dual 8259s are present too (KVM's PICs)
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_LOCAL_APIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF

# --- DSDT. ---
DSDT_REVISION = 2
# PNP ids Linux's PNP drivers bind: 8250_pnp, i8042, rtc_cmos, pnp/system.c.
HID_COM = "PNP0501"  # 16550A-compatible UART
HID_KEYBOARD = "PNP0303"  # IBM enhanced keyboard (i8042)
HID_RTC = "PNP0B00"  # AT real-time clock
HID_MOTHERBOARD = "PNP0C02"  # motherboard resources: ports reserved, no driver
HID_VIRTIO_MMIO = "LNRO0005"  # a virtio-mmio window (Linux's virtio_mmio ACPI match)
I8042_PORT_LENGTH = 1

RSDP_SIGNATURE = b"RSD PTR "


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table with the common header and a checksum that makes it sum to 0."""
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum_byte(bytes(table))
    return bytes(table)


def _gas(port: int) -> bytes:
    """A Generic Address Structure for one byte-wide I/O port."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, ACCESS_BYTE, port)


def pc_devices() -> list[bytes]:
    """The DSDT's devices: what the device model's "pc" machine emulates."""
    return [
        aml.simple_device("COM1", HID_COM, 1, [aml.io(layout.COM1_PORT, layout.COM1_PORT_COUNT),
                                                aml.irq(layout.COM1_IRQ)]),
        aml.simple_device("KBD", HID_KEYBOARD, 0, [aml.io(layout.I8042_DATA_PORT, I8042_PORT_LENGTH),
                                                   aml.io(layout.I8042_COMMAND_PORT, I8042_PORT_LENGTH),
                                                   aml.irq(layout.I8042_IRQ)]),
        aml.simple_device("RTC", HID_RTC, 0, [aml.io(layout.RTC_PORT, layout.RTC_PORT_COUNT),
                                              aml.irq(layout.RTC_IRQ)]),
        aml.simple_device("PMRG", HID_MOTHERBOARD, 0, [aml.io(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT)]),
    ]


def virtio_devices(windows: Iterable[tuple[int, int]]) -> list[bytes]:
    """A DSDT device per virtio-mmio window, given as (base, GSI)."""
    return [aml.simple_device(f"VR{index:02X}", HID_VIRTIO_MMIO, index,
                              [aml.memory32_fixed(base, layout.VIRTIO_MMIO_SIZE), aml.interrupt(gsi)])
            for index, (base, gsi) in enumerate(windows)]


def build_dsdt(devices: Iterable[bytes] = ()) -> bytes:
    """\\_SB_ with the PC devices and ``devices``, and \\_S5 for power-off."""
    system_bus = aml.scope("\\_SB_", [*pc_devices(), *devices])
    s5 = aml.name("\\_S5_", aml.package([SLEEP_TYPE_S5, 0, 0, 0]))
    return _table(b"DSDT", DSDT_REVISION, system_bus + s5)


def build_fadt(dsdt_address: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, data: bytes) -> None:
        body[offset - HEADER_SIZE : offset - HEADER_SIZE + len(data)] = data

    put(FADT_SCI_INT_OFFSET, struct.pack("<H", SCI_IRQ))
    put(FADT_CENTURY_OFFSET, bytes([RTC_CENTURY_REGISTER]))
    put(FADT_IAPC_BOOT_ARCH_OFFSET, struct.pack("<H", IAPC_BOOT_ARCH))
    put(FADT_FLAGS_OFFSET, struct.pack("<I", FLAG_HW_REDUCED_ACPI | FLAG_RESET_REG_SUP))
    put(FADT_RESET_REG_OFFSET, _gas(RESET_PORT))
    put(FADT_RESET_VALUE_OFFSET, bytes([RESET_VALUE]))
    put(FADT_MINOR_REVISION_OFFSET, bytes([FADT_MINOR_REVISION]))
    put(FADT_DSDT_OFFSET, struct.pack("<I", dsdt_address))
    put(FADT_X_DSDT_OFFSET, struct.pack("<Q", dsdt_address))
    put(FADT_SLEEP_CONTROL_OFFSET, _gas(SLEEP_CONTROL_PORT))
    put(FADT_SLEEP_STATUS_OFFSET, _gas(SLEEP_STATUS_PORT))
    put(FADT_HYPERVISOR_ID_OFFSET, b"MPVMM\0\0\0")
    return _table(b"FACP", FADT_REVISION, bytes(body))


def build_madt(cpus: int) -> bytes:
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id(cpus), 0, layout.IOAPIC_ADDR, 0)
    # Every LINT1 is NMI; MPS INTI flags 5 = active high, edge-triggered.
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0x5, 1)
    return _table(b"APIC", MADT_REVISION, bytes(body))


def build_xsdt(addresses: list[int]) -> bytes:
    return _table(b"XSDT", 1, struct.pack(f"<{len(addresses)}Q", *addresses))


def build_rsdp(xsdt_address: int) -> bytes:
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", RSDP_SIGNATURE, 0, OEM_ID, 2, 0, RSDP_SIZE,
                                 xsdt_address, 0, bytes(3)))
    rsdp[8] = checksum_byte(bytes(rsdp[:RSDP_V1_SIZE]))
    rsdp[32] = checksum_byte(bytes(rsdp))
    return bytes(rsdp)


def _align(value: int, alignment: int = 16) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def build_acpi(base: int, cpus: int, devices: Iterable[bytes] = ()) -> tuple[int, bytes]:
    """Every table laid out from ``base``: ``(rsdp_address, blob)``; the RSDP is first.

    ``devices`` are extra DSDT devices (``aml.simple_device`` terms) beside the PC ones.
    """
    if not 1 <= cpus <= 255:
        raise ValueError(f"the MADT's xAPIC entries describe 1 to 255 CPUs, not {cpus}")
    blob = bytearray()

    def place(table: bytes) -> int:
        nonlocal blob
        blob += bytes(_align(len(blob)) - len(blob))
        address = base + len(blob)
        blob += table
        return address

    rsdp_address = place(bytes(RSDP_SIZE))  # filled in last, when the XSDT's place is known
    dsdt = place(build_dsdt(devices))
    fadt = place(build_fadt(dsdt))
    madt = place(build_madt(cpus))
    xsdt = place(build_xsdt([fadt, madt]))
    blob[0:RSDP_SIZE] = build_rsdp(xsdt)
    return rsdp_address, bytes(blob)
