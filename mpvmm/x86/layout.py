"""The guest-physical and port map of an mpvmm machine: every address lives here.

Guest-physical addresses are ``GuestAddress`` values so that a host pointer or
a file offset is never passed where a guest address is meant.
"""

from typing import NewType

GuestAddress = NewType("GuestAddress", int)

PAGE_SIZE = 4096
MIB = 1 << 20
GIB = 1 << 30

# --- Built-in guest: the boot structures the supervisor writes for it. ---
# The GDT holds null, kernel code/data, user code/data and the TSS descriptor.
BOOT_GDT_ADDR = GuestAddress(0x1000)
# A 64-bit TSS: never used by a CPL-3-only guest, but VM entry demands a valid TR.
BOOT_TSS_ADDR = GuestAddress(0x2000)
# Identity page tables: PML4, one PDPT, four PDs of 2 MiB pages covering 4 GiB.
BOOT_PML4_ADDR = GuestAddress(0x10000)
BOOT_PDPT_ADDR = GuestAddress(0x11000)
BOOT_PD_ADDR = GuestAddress(0x12000)
BOOT_PD_COUNT = 4
# The parameter block the supervisor fills and the guest reads (guest/abi.h).
GUEST_PARAMS_ADDR = GuestAddress(0x20000)
# One report record per vCPU that the guest fills with its own counts.
GUEST_REPORTS_ADDR = GuestAddress(0x21000)
GUEST_REPORT_STRIDE = 256
# Counters all vCPUs increment with locked instructions (the atomics workload).
GUEST_SHARED_ADDR = GuestAddress(0xF0000)
# The built-in guest's code and data, linked at this address (guest/guest.ld).
GUEST_CODE_ADDR = GuestAddress(0x100000)
GUEST_CODE_MAX = 1 * MIB
# Per-vCPU stacks follow the code; vCPU i's stack top is base + (i + 1) * size.
GUEST_STACKS_ADDR = GuestAddress(0x200000)
GUEST_STACK_SIZE = 16 * 1024

# --- KVM's own pages: x86 VMX needs three pages for the real-mode TSS and one
# for the EPT identity map, placed where no RAM or device is (below 4 GiB,
# under the BIOS area), as QEMU and Firecracker do.
KVM_TSS_ADDR = GuestAddress(0xFFFBD000)
KVM_IDENTITY_MAP_ADDR = GuestAddress(0xFFFBC000)

# --- RAM and the MMIO hole: RAM runs from 0 to the hole, the rest above 4 GiB.
MMIO_HOLE_START = GuestAddress(3 * GIB)
MMIO_HOLE_END = GuestAddress(4 * GIB)
# The MMIO test device of the device model (the mmio workload pokes it): a
# page of registers, then its doorbell on a page of its own.
MMIO_TESTDEV_ADDR = GuestAddress(0xD0000000)
MMIO_TESTDEV_REGISTERS = PAGE_SIZE
MMIO_TESTDEV_SIZE = 2 * PAGE_SIZE
MMIO_TESTDEV_DOORBELL_ADDR = GuestAddress(MMIO_TESTDEV_ADDR + MMIO_TESTDEV_REGISTERS)

# --- I/O ports. ---
COM1_PORT = 0x3F8
COM1_PORT_COUNT = 8
# mpvmm's paravirtual ports, handled natively in the vCPU run loop.
NULL_PORT = 0x510  # writes and reads do nothing: the cheapest possible exit
DEBUG_EXIT_PORT = 0x514  # a write ends this vCPU with the written status
SLEEP_PORT = 0x518  # a write sleeps the vCPU for that many microseconds
PARAVIRT_PORT_COUNT = 4
# The device model's test device (the pio-device workload): eight data
# ports, then its doorbell.
PIO_TESTDEV_PORT = 0x520
PIO_TESTDEV_REGISTERS = 8
PIO_TESTDEV_PORT_COUNT = 16
PIO_TESTDEV_DOORBELL_PORT = PIO_TESTDEV_PORT + PIO_TESTDEV_REGISTERS

# --- Linux boot (issue 5): the firmware-less PC a kernel expects, as
# Firecracker lays it out (docs/linux.md, "Memory layout"). The built-in guest's
# regions above are not used by a Linux VM, and these not by the built-in guest.
LINUX_GDT_ADDR = GuestAddress(0x500)  # __BOOT_CS 0x10, __BOOT_DS 0x18
LINUX_ZERO_PAGE_ADDR = GuestAddress(0x7000)  # boot_params; RSI points here
LINUX_BOOT_STACK_TOP = GuestAddress(0x8FF0)  # the kernel loads its own RSP at once
LINUX_CMDLINE_ADDR = GuestAddress(0x20000)
LINUX_CMDLINE_MAX = 4096  # the slot's size; the kernel's own limit is in its header
# Usable RAM ends at the EBDA: the AP trampoline needs base memory below it.
LINUX_EBDA_START = GuestAddress(0x9FC00)
# MP floating pointer + config table at the EBDA (Linux scans it), ACPI tables
# from 0xE0000 (the legacy RSDP scan area); [EBDA, 1 MiB) is e820-reserved.
LINUX_MPTABLE_ADDR = LINUX_EBDA_START
LINUX_ACPI_ADDR = GuestAddress(0xE0000)
LINUX_ACPI_MAX = 0x10000
LINUX_HIGH_MEMORY = GuestAddress(0x100000)  # RAM above the BIOS area
# bzImages whose payload we cannot unpack load here (code32_start's default).
LINUX_BZIMAGE_LOAD_ADDR = LINUX_HIGH_MEMORY
IOAPIC_ADDR = GuestAddress(0xFEC00000)
LAPIC_ADDR = GuestAddress(0xFEE00000)
# Legacy PC ports a kernel uses, emulated by the device model.
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # 0xFE written here resets the machine
RTC_PORT = 0x70  # index at 0x70, data at 0x71
RTC_PORT_COUNT = 2
# ACPI hardware-reduced sleep control/status and reset registers (FADT).
ACPI_PM_PORT = 0x600
ACPI_PM_PORT_COUNT = 4
# ISA IRQs of the legacy devices; each is the IOAPIC pin of the same number
# (KVM's default GSI routing, and what the MP table and MADT describe).
COM1_IRQ = 4
I8042_IRQ = 1  # the keyboard controller
RTC_IRQ = 8  # update and alarm interrupts
