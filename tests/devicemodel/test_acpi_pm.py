"""The ACPI PM block as a state machine, and at the ports the FADT gives the guest."""

import struct

from mpvmm.devicemodel import acpi_pm
from mpvmm.devicemodel.machine import DeviceModel
from mpvmm.devicemodel.pc import build_pc_buses
from mpvmm.devicemodel.protocol import KIND_READ, KIND_WRITE, SPACE_PIO, Request
from mpvmm.x86 import acpi, layout

S5 = (acpi.SLEEP_TYPE_S5 << acpi.SLP_TYP_SHIFT) | acpi.SLP_EN


def _pm():
    events = []
    return acpi_pm.AcpiPm(events.append), events


def test_sleep_control_powers_off_only_for_s5_with_slp_en():
    pm, events = _pm()
    pm.write(acpi.SLEEP_CONTROL_OFFSET, 1, acpi.SLEEP_TYPE_S5 << acpi.SLP_TYP_SHIFT)  # type set, not enabled
    assert events == [] and pm.ignored_writes == 0
    pm.write(acpi.SLEEP_CONTROL_OFFSET, 1, (3 << acpi.SLP_TYP_SHIFT) | acpi.SLP_EN)  # S3: not in our DSDT
    assert events == [] and pm.ignored_writes == 1
    pm.write(acpi.SLEEP_CONTROL_OFFSET, 1, S5)
    assert events == ["poweroff"]
    assert pm.stats() == {"poweroffs": 1, "reboots": 0, "ignored_writes": 1}


def test_reset_register_reboots_on_the_fadt_reset_value_only():
    pm, events = _pm()
    pm.write(acpi.RESET_OFFSET, 1, acpi.RESET_VALUE + 1)
    assert events == [] and pm.ignored_writes == 1
    pm.write(acpi.RESET_OFFSET, 1, acpi.RESET_VALUE)
    assert events == ["reboot"]


def test_sleep_status_clear_is_accepted_and_reads_zero():
    pm, events = _pm()
    pm.write(acpi.SLEEP_STATUS_OFFSET, 1, acpi.WAK_STS)  # what Linux writes before sleeping
    assert pm.read(acpi.SLEEP_STATUS_OFFSET, 1) == 0  # no wake has happened
    assert pm.ignored_writes == 0 and events == []
    pm.write(acpi.SLEEP_STATUS_OFFSET, 1, 0x01)  # a reserved bit
    assert pm.ignored_writes == 1


def test_reads_of_write_only_registers_and_past_the_block():
    pm, _ = _pm()
    assert [pm.read(offset, 1) for offset in range(layout.ACPI_PM_PORT_COUNT)] == [0, 0, 0, 0xFF]
    assert pm.read(acpi.SLEEP_CONTROL_OFFSET, 2) == 0xFFFF


def test_wide_accesses_do_nothing():
    pm, events = _pm()
    pm.write(acpi.SLEEP_CONTROL_OFFSET, 2, S5)
    pm.write(acpi.RESET_OFFSET, 4, acpi.RESET_VALUE)
    assert events == [] and pm.ignored_writes == 2


def _gas_port(fadt: bytes, offset: int) -> int:
    space, width, _bit, access, address = struct.unpack_from("<BBBBQ", fadt, offset)
    assert (space, width, access) == (acpi.GAS_SYSTEM_IO, 8, acpi.ACCESS_BYTE)
    return address


def test_the_ports_the_fadt_names_reach_the_device():
    """What Linux reads from the FADT, written through the pc machine's bus, ends the VM."""
    fadt = acpi.build_fadt(0)
    events = []
    model = DeviceModel(machine=build_pc_buses(None, {}, events.append))

    def io(kind, port, value=0):
        return model.handle(Request(kind, 0, SPACE_PIO, port, 1, value, 0))

    io(KIND_WRITE, _gas_port(fadt, acpi.FADT_SLEEP_STATUS_OFFSET), acpi.WAK_STS)
    assert io(KIND_READ, _gas_port(fadt, acpi.FADT_SLEEP_STATUS_OFFSET)) == 0
    io(KIND_WRITE, _gas_port(fadt, acpi.FADT_SLEEP_CONTROL_OFFSET), S5)
    io(KIND_WRITE, _gas_port(fadt, acpi.FADT_RESET_REG_OFFSET), fadt[acpi.FADT_RESET_VALUE_OFFSET])
    assert events == ["poweroff", "reboot"]
    assert model.stats()["devices"]["acpi-pm"] == {"poweroffs": 1, "reboots": 1, "ignored_writes": 0}
