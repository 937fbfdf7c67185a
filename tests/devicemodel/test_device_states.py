"""Every device's state record: rebuilt equal, bad records refused; whole machines rebuilt by name."""

import pytest

from mpvmm.devicemodel.acpi_pm import AcpiPm
from mpvmm.devicemodel.devices import Sink, TestDevice
from mpvmm.devicemodel.i8042 import CMD_READ_CTR, CMD_WRITE_CTR, I8042
from mpvmm.devicemodel.machine import COM1_NAME, PIO_TESTDEV_NAME
from mpvmm.devicemodel.machines import build_machine, check_states
from mpvmm.devicemodel import rtc as cmos
from mpvmm.devicemodel.rtc import Rtc
from mpvmm.errors import DeviceModelError


def exercised_devices():
    """One of each device, each moved away from its power-on state."""
    testdev = TestDevice()
    testdev.write(0, 4, 7)
    testdev.write(4, 4, 9)
    testdev.read(0, 4)
    sink = Sink()
    sink.write(0, 1, 1)
    rtc = Rtc(clock=lambda: 0.0)
    rtc.write(0, 1, 0x0F)  # select the shutdown status byte
    rtc.write(1, 1, 0x0A)
    i8042 = I8042()
    i8042.write(4, 1, CMD_WRITE_CTR)  # a command waiting for its data byte
    pm = AcpiPm()
    pm.write(2, 1, 1)  # a reboot
    return {"testdev": testdev, "sink": sink, "rtc": rtc, "i8042": i8042, "acpi-pm": pm}


@pytest.mark.parametrize("name", ["testdev", "sink", "rtc", "i8042", "acpi-pm"])
def test_state_rebuilds_an_equal_device(name):
    device = exercised_devices()[name]
    rebuilt = type(device).from_state(device.state())
    assert rebuilt.state() == device.state()
    assert rebuilt.stats() == device.stats()


def test_a_rebuilt_device_goes_on_where_it_was():
    i8042 = I8042.from_state(exercised_devices()["i8042"].state())
    i8042.write(0, 1, 0x61)  # the data byte of the pending write-command-byte
    i8042.write(4, 1, CMD_READ_CTR)
    assert i8042.read(0, 1) == 0x61
    rtc = Rtc.from_state(exercised_devices()["rtc"].state())
    rtc.write(0, 1, 0x0F)
    assert rtc.read(1, 1) == 0x0A


AT_20 = 999_999_980.0  # 2001-09-09 01:46:20 UTC: second 20 of a minute


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def rtc_with_alarm(clock, alarm_seconds, triggers):
    """An RTC at ``clock`` whose alarm fires at the second ``alarm_seconds`` (this minute and hour)."""
    rtc = Rtc(clock=clock, trigger=lambda: triggers.append(clock.now))
    alarms = {cmos.REG_SECONDS_ALARM: alarm_seconds, cmos.REG_MINUTES_ALARM: cmos.ALARM_ANY,
              cmos.REG_HOURS_ALARM: cmos.ALARM_ANY}
    for register, value in alarms.items():
        rtc.write(0, 1, register)
        rtc.write(1, 1, value)
    rtc.write(0, 1, cmos.REG_STATUS_B)
    rtc.write(1, 1, cmos.STATUS_B_24H | cmos.STATUS_B_BINARY | cmos.STATUS_B_AIE)
    return rtc


def read_status_c(rtc):
    rtc.write(0, 1, cmos.REG_STATUS_C)
    return rtc.read(1, 1)


def test_a_pending_rtc_alarm_is_restored_and_not_raised_again():
    clock, triggers = Clock(AT_20), []
    rtc = rtc_with_alarm(clock, 21, triggers)
    clock.now += 1
    rtc.on_timer()
    assert triggers == [clock.now]  # raised once before the save; the irqchip's state keeps that edge
    restored_triggers = []
    restored = Rtc.from_state(rtc.state(), clock=clock, trigger=lambda: restored_triggers.append(clock.now))
    restored.on_timer()
    assert restored_triggers == []
    assert read_status_c(restored) == cmos.STATUS_C_IRQF | cmos.STATUS_C_AF | cmos.STATUS_C_UF
    assert read_status_c(restored) == 0  # read clears, as before the save


def test_an_armed_rtc_alarm_fires_after_a_restore():
    clock, triggers = Clock(AT_20), []
    rtc = rtc_with_alarm(clock, 25, triggers)
    saved = rtc.state()
    clock.now += 2
    restored = Rtc.from_state(saved, clock=clock, trigger=lambda: triggers.append(clock.now))
    assert restored.timer_deadline() == AT_20 + 1  # the update cycles it missed are due
    restored.on_timer()
    assert triggers == [] and read_status_c(restored) == cmos.STATUS_C_UF  # AIE only: UF raises nothing
    clock.now += 3
    restored.on_timer()
    assert triggers == [AT_20 + 5]
    assert read_status_c(restored) == cmos.STATUS_C_IRQF | cmos.STATUS_C_AF | cmos.STATUS_C_UF


def test_an_rtc_alarm_that_passes_while_saved_is_flagged_at_restore():
    clock, triggers = Clock(AT_20), []
    saved = rtc_with_alarm(clock, 25, triggers).state()
    clock.now += 3600  # restored an hour later
    restored = Rtc.from_state(saved, clock=clock, trigger=lambda: triggers.append(clock.now))
    restored.on_timer()
    assert triggers == [clock.now]  # once, however many matching seconds went by


def test_an_rtc_restored_on_a_host_whose_clock_is_behind_counts_from_that_clock():
    clock, triggers = Clock(AT_20), []
    saved = rtc_with_alarm(clock, 21, triggers).state()
    clock.now -= 100
    restored = Rtc.from_state(saved, clock=clock, trigger=lambda: triggers.append(clock.now))
    assert restored.timer_deadline() == clock.now + 1
    clock.now = AT_20 + 1
    restored.on_timer()
    assert triggers == [clock.now]


@pytest.mark.parametrize("name, change", [
    ("testdev", {"writes": -1}),
    ("testdev", {"reads": True}),
    ("sink", {"extra": 1}),
    ("rtc", {"ram": b"short"}),
    ("rtc", {"index": 0x80}),
    ("rtc", {"flags": 0x100}),
    ("rtc", {"last_update": -1}),
    ("rtc", {"interrupts": None}),
    ("i8042", {"output": b"x" * 17}),
    ("i8042", {"pending_command": "0x60"}),
    ("acpi-pm", {"poweroffs": 1 << 20}),
    ("acpi-pm", {"ignored_writes": "1"}),
])
def test_a_bad_record_is_refused(name, change):
    device = exercised_devices()[name]
    state = {**device.state(), **change}
    with pytest.raises(DeviceModelError):
        type(device).from_state(state)


@pytest.mark.parametrize("machine", ["builtin", "pc"])
def test_a_machine_rebuilds_from_its_devices_states(machine):
    _pio, _mmio, devices = build_machine(machine, None, {}, lambda event: None)
    devices[PIO_TESTDEV_NAME].write(0, 4, 5)
    devices[COM1_NAME].write(7, 1, 0x42)  # the scratch register
    states = {name: device.state() for name, device in devices.items()}
    _pio, _mmio, rebuilt = build_machine(machine, None, {}, lambda event: None, states)
    assert {name: device.state() for name, device in rebuilt.items()} == states
    check_states(machine, states)


def test_states_of_another_machine_are_refused():
    _pio, _mmio, pc = build_machine("pc", None, {}, lambda event: None)
    pc_states = {name: device.state() for name, device in pc.items()}
    with pytest.raises(DeviceModelError, match="lacks: acpi-pm, i8042, rtc"):
        check_states("builtin", pc_states)
    _pio, _mmio, builtin = build_machine("builtin", None, {}, lambda event: None)
    with pytest.raises(DeviceModelError, match="no record for rtc"):
        check_states("pc", {name: device.state() for name, device in builtin.items()})
    with pytest.raises(DeviceModelError):
        check_states("builtin", [1, 2])
