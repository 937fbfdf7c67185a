"""Debian's generic kernel (XZ) with ACPI off: it finds the CPUs and IRQs in our MP table.

Booted by mpvmm inside an L1 (nested KVM), one L1 for the module. Without
ACPI the kernel has the legacy PIC and the MP table's ISA interrupt entries,
so init's output (IRQ 4) tests that path of the interrupt routing; the
sysrq crash with ``panic=-1`` reboots at once, through the i8042 reset
(``reboot=k``), which mpvmm ends cleanly.
"""

import pytest

from tests.linux.guest_report import boot_to_init, irq_count

pytestmark = pytest.mark.nested_kvm

# quiet: the checks read the kernel's lines from init's dmesg report; the panic still prints.
CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off acpi=off quiet"


def test_generic_kernel_uses_the_mp_table_and_a_panic_reboots(nested_linux, generic_kernel, init_images):
    result, report = boot_to_init(nested_linux, generic_kernel, init_images, "panic", 2,
                                  "generic kernel (MP table), 2 vCPUs, panic", cmdline=CMDLINE)
    kernel_lines = " | ".join(report.get("dmesg", []))
    assert "Intel MultiProcessor Specification v1.4" in kernel_lines, result.describe()
    assert "MPTABLE: OEM ID: MPVMM" in kernel_lines
    assert "pnp" not in report  # no ACPI, so no PNP devices: the MP table alone routed IRQ 4
    assert irq_count(report, "ttyS0", 4) > 0
    assert report.get("panicking") == [""]
    assert "Kernel panic - not syncing: sysrq triggered crash" in result.console
