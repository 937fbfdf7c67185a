"""RTC, i8042, ACPI power registers and the "pc" machine, as pure state machines."""

import calendar
import os

import pytest

from mpvmm.devicemodel import acpi_pm, i8042, rtc
from mpvmm.devicemodel.machine import DeviceModel
from mpvmm.devicemodel.pc import build_pc_buses, eventfd_trigger
from mpvmm.devicemodel.protocol import KIND_READ, KIND_WRITE, SPACE_PIO, Request
from mpvmm.x86 import acpi as acpi_tables

# 2024-02-29 23:59:58 UTC, a Thursday.
WHEN = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))


def _cmos(device, register):
    device.write(0, 1, register)
    return device.read(1, 1)


def test_rtc_reads_the_clock_in_bcd_by_default():
    clock = rtc.Rtc(clock=lambda: WHEN)
    values = {r: _cmos(clock, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)}
    assert values == {0: 0x58, 2: 0x59, 4: 0x23, 6: 0x05, 7: 0x29, 8: 0x02, 9: 0x24, 0x32: 0x20}


def test_rtc_binary_mode_and_24h_forced():
    clock = rtc.Rtc(clock=lambda: WHEN)
    clock.write(0, 1, rtc.REG_STATUS_B)
    clock.write(1, 1, rtc.STATUS_B_BINARY)  # 12-hour asked for by omission: stays 24-hour
    assert _cmos(clock, rtc.REG_STATUS_B) == rtc.STATUS_B_BINARY | rtc.STATUS_B_24H
    assert _cmos(clock, rtc.REG_HOURS) == 23 and _cmos(clock, rtc.REG_YEAR) == 24


def test_rtc_status_registers_and_nmi_bit():
    clock = rtc.Rtc(clock=lambda: WHEN)
    assert _cmos(clock, 0x80 | rtc.REG_STATUS_A) & 0x80 == 0  # NMI bit ignored; UIP clear
    assert _cmos(clock, rtc.REG_STATUS_D) == rtc.STATUS_D_VALID
    assert _cmos(clock, rtc.REG_STATUS_C) == 0


def test_rtc_ram_accepts_the_shutdown_status_and_ignores_time_writes():
    clock = rtc.Rtc(clock=lambda: WHEN)
    clock.write(0, 1, 0x0F)
    clock.write(1, 1, 0x0A)  # Linux's AP start-up: "jump via the warm reset vector"
    assert _cmos(clock, 0x0F) == 0x0A
    clock.write(0, 1, rtc.REG_SECONDS)
    clock.write(1, 1, 0x00)
    assert _cmos(clock, rtc.REG_SECONDS) == 0x58
    assert clock.read(0, 1) == 0xFF  # the index port is write-only


class _Recorder:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


def _kbc():
    reset, trigger = _Recorder(), _Recorder()
    return i8042.I8042(reset=reset, trigger=trigger), reset, trigger


def test_i8042_probe_sequence():
    kbc, reset, trigger = _kbc()
    assert kbc.read(4, 1) & 0x02 == 0  # input buffer never full: Linux may write
    assert kbc.read(4, 1) & i8042.STATUS_NOT_INHIBITED  # no "Keylock active" warning
    kbc.write(4, 1, i8042.CMD_SELF_TEST)
    assert kbc.read(4, 1) & i8042.STATUS_OUTPUT_FULL
    assert kbc.read(0, 1) == 0x55
    assert kbc.read(4, 1) & i8042.STATUS_OUTPUT_FULL == 0
    kbc.write(4, 1, i8042.CMD_READ_CTR)
    ctr = kbc.read(0, 1)
    assert ctr == i8042.CTR_DEFAULT
    kbc.write(4, 1, i8042.CMD_WRITE_CTR)
    kbc.write(0, 1, ctr & ~i8042.CTR_KBD_INT)
    kbc.write(4, 1, i8042.CMD_READ_CTR)
    assert kbc.read(0, 1) == ctr & ~i8042.CTR_KBD_INT
    kbc.write(4, 1, i8042.CMD_TEST_KBD)
    assert kbc.read(0, 1) == 0
    kbc.write(4, 1, i8042.CMD_TEST_AUX)
    assert kbc.read(0, 1) == i8042.AUX_ABSENT
    assert reset.calls == 0


def test_i8042_keyboard_reset_is_acknowledged_and_raises_irq1():
    kbc, _reset, trigger = _kbc()
    kbc.write(0, 1, 0xFF)
    assert [kbc.read(0, 1), kbc.read(0, 1)] == [0xFA, 0xAA]
    assert trigger.calls >= 1


@pytest.mark.parametrize("writes", [[(4, 0xFE)], [(4, 0xD1), (0, 0xFE)]])
def test_i8042_reset_commands_reboot(writes):
    kbc, reset, _trigger = _kbc()
    for offset, value in writes:
        kbc.write(offset, 1, value)
    assert reset.calls == 1 and kbc.stats() == {"resets": 1}


def test_i8042_output_port_write_with_reset_line_high_does_nothing():
    kbc, reset, _ = _kbc()
    kbc.write(4, 1, i8042.CMD_WRITE_OUTPUT_PORT)
    kbc.write(0, 1, 0xDF)
    assert reset.calls == 0


def test_acpi_sleep_control_s5_is_poweroff_and_reset_register_reboots():
    events = []
    pm = acpi_pm.AcpiPm(events.append)
    pm.write(0, 1, 3 << 2 | acpi_pm.SLP_EN)  # S3 is not ours to do: ignored
    pm.write(0, 1, 5 << 2)  # no SLP_EN: nothing happens
    assert events == []
    # What Linux writes after reading \_S5 from our DSDT.
    pm.write(0, 1, (acpi_tables.SLEEP_TYPE_S5 << 2) | acpi_tables.SLP_EN)
    pm.write(2, 1, acpi_tables.RESET_VALUE)
    assert events == ["poweroff", "reboot"]
    assert pm.read(1, 1) == 0


def test_pc_machine_routes_ports_to_devices_and_events_out():
    events = []
    model = DeviceModel(machine=build_pc_buses(None, {}, events.append))

    def io(kind, port, value=0):
        return model.handle(Request(kind, 0, SPACE_PIO, port, 1, value, 0))

    io(KIND_WRITE, 0x70, 0x0D)
    assert io(KIND_READ, 0x71) == 0x80
    io(KIND_WRITE, 0x64, 0xAA)
    assert io(KIND_READ, 0x60) == 0x55
    io(KIND_WRITE, 0x64, 0xFE)
    io(KIND_WRITE, acpi_tables.SLEEP_CONTROL_PORT, 0x34)
    assert events == ["reboot", "poweroff"]
    assert model.stats()["devices"]["i8042"] == {"resets": 1}


def test_eventfd_trigger_signals_the_eventfd():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        trigger = eventfd_trigger(fd)
        trigger()
        trigger()
        assert os.eventfd_read(fd) == 2
    finally:
        os.close(fd)
