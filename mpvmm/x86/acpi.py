"""Minimal ACPI tables: RSDP, XSDT, FADT, MADT and a DSDT with \\_S5.

Like Firecracker's (revision 6 FADT, hardware-reduced) and Cloud
Hypervisor's power-off: the FADT sets HW_REDUCED_ACPI and names a sleep
control register in I/O space; the DSDT's \\_S5 package gives SLP_TYP 5, so
Linux's ``poweroff`` writes ``(5 << 2) | SLP_EN`` there, which the device
model turns into a power-off event. The FADT's reset register (port
write of 1) gives ``reboot`` the same clean path. Reduced hardware also
means no SCI, no PM timer and no FACS. The MADT lists every vCPU's local
APIC (Debian's cloud kernel has no MP-table parser) and the IOAPIC with no
interrupt source override: KVM routes GSI n to pin n, the PIT on pin 0.
"""

from __future__ import annotations

import struct

from mpvmm.x86 import layout
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
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG_OFFSET = 116
FADT_RESET_VALUE_OFFSET = 128
FADT_MINOR_REVISION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_SLEEP_CONTROL_OFFSET = 244
FADT_SLEEP_STATUS_OFFSET = 256
FADT_HYPERVISOR_ID_OFFSET = 268
IAPC_8042 = 1 << 1  # an i8042 exists: Linux probes it by its ports
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
FLAG_RESET_REG_SUP = 1 << 10
FLAG_HW_REDUCED_ACPI = 1 << 20
SCI_IRQ = 9  # ignored on reduced hardware; the value PCs use
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1
RESET_VALUE = 1

# I/O ports of the device model's ACPI power-management device.
SLEEP_CONTROL_PORT = layout.ACPI_PM_PORT
SLEEP_STATUS_PORT = layout.ACPI_PM_PORT + 1
RESET_PORT = layout.ACPI_PM_PORT + 2
SLEEP_TYPE_S5 = 5  # \_S5's SLP_TYP; sleep control gets (5 << 2) | SLP_EN
SLP_EN = 0x20

# --- MADT. ---
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1  # dual 8259s are present too (KVM's PICs)
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_LOCAL_APIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF

# --- DSDT: Name (\_S5, Package (4) { 5, 0, 0, 0 }) in AML. ---
DSDT_REVISION = 2
AML_S5 = bytes([0x08, *b"_S5_", 0x12, 0x07, 0x04, 0x0A, SLEEP_TYPE_S5, 0x00, 0x00, 0x00])

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


def build_dsdt() -> bytes:
    return _table(b"DSDT", DSDT_REVISION, AML_S5)


def build_fadt(dsdt_address: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, data: bytes) -> None:
        body[offset - HEADER_SIZE : offset - HEADER_SIZE + len(data)] = data

    put(FADT_SCI_INT_OFFSET, struct.pack("<H", SCI_IRQ))
    put(FADT_IAPC_BOOT_ARCH_OFFSET, struct.pack("<H", IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED))
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


def build_acpi(base: int, cpus: int) -> tuple[int, bytes]:
    """Every table laid out from ``base``: ``(rsdp_address, blob)``; the RSDP is first."""
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
    dsdt = place(build_dsdt())
    fadt = place(build_fadt(dsdt))
    madt = place(build_madt(cpus))
    xsdt = place(build_xsdt([fadt, madt]))
    blob[0:RSDP_SIZE] = build_rsdp(xsdt)
    return rsdp_address, bytes(blob)
