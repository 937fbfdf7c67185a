"""The Intel MultiProcessor table (MP spec 1.4), like Firecracker's mptable.rs.

Linux kernels built with CONFIG_X86_MPPARSE (Debian's generic one) find the
CPUs here when ACPI is off; the cloud kernel has no parser and needs the
MADT (acpi.py). Both describe the same CPUs: APIC id = vCPU index, the
IOAPIC at id ``cpus``, ISA IRQ i on IOAPIC pin i (KVM's default routing).
"""

from __future__ import annotations

import struct

from mpvmm.x86 import layout

FLOATING_SIGNATURE = b"_MP_"
CONFIG_SIGNATURE = b"PCMP"
SPEC_REVISION = 4  # MP spec 1.4
OEM_ID = b"MPVMM   "
PRODUCT_ID = b"000000000000"
APIC_VERSION = 0x14  # an integrated local APIC, as KVM's reports
CPU_SIGNATURE = 0x600  # family 6: only informational with a local APIC
CPU_FEATURES = 0x201  # FPU and APIC present
CPU_ENABLED = 1
CPU_BSP = 2
IOAPIC_ENABLED = 1
ISA_IRQS = 16
BUS_ISA = b"ISA   "
ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
ALL_LAPICS = 0xFF
FLOATING_SIZE = 16
CONFIG_HEADER_SIZE = 44


def checksum_byte(data: bytes) -> int:
    """The byte that makes ``data`` plus it sum to 0 modulo 256."""
    return -sum(data) & 0xFF


def ioapic_id(cpus: int) -> int:
    return cpus


def build_mptable(address: int, cpus: int) -> bytes:
    """The floating pointer at ``address`` and the config table right after it."""
    if not 1 <= cpus <= 254:
        raise ValueError(f"an MP table describes 1 to 254 CPUs, not {cpus}")
    entries = []
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBIIQ", ENTRY_PROCESSOR, cpu, APIC_VERSION, flags,
                                   CPU_SIGNATURE, CPU_FEATURES, 0))
    bus_id = 0
    entries.append(struct.pack("<BB6s", ENTRY_BUS, bus_id, BUS_ISA))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id(cpus), APIC_VERSION,
                               IOAPIC_ENABLED, layout.IOAPIC_ADDR))
    for irq in range(ISA_IRQS):
        # Flags 0: polarity and trigger "conform to the bus" (ISA: edge, high).
        entries.append(struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, bus_id, irq,
                                   ioapic_id(cpus), irq))
    # The PIC's output reaches the BSP's LINT0 only; NMI goes to every LINT1.
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, bus_id, 0,
                               0, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, bus_id, 0,
                               ALL_LAPICS, 1))
    body = b"".join(entries)
    config_address = address + FLOATING_SIZE
    length = CONFIG_HEADER_SIZE + len(body)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", CONFIG_SIGNATURE, length, SPEC_REVISION, 0,
                                   OEM_ID, PRODUCT_ID, 0, 0, len(entries), layout.LAPIC_ADDR, 0, 0, 0))
    header[7] = checksum_byte(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBBB4s", FLOATING_SIGNATURE, config_address, 1,
                                     SPEC_REVISION, 0, 0, bytes(4)))
    floating[10] = checksum_byte(bytes(floating))
    return bytes(floating) + bytes(header) + body
