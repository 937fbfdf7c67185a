"""Every device's state record: rebuilt equal, bad records refused; whole machines rebuilt by name."""

import pytest

from mpvmm.devicemodel.acpi_pm import AcpiPm
from mpvmm.devicemodel.devices import Sink, TestDevice
from mpvmm.devicemodel.i8042 import CMD_READ_CTR, CMD_WRITE_CTR, I8042
from mpvmm.devicemodel.machine import COM1_NAME, PIO_TESTDEV_NAME
from mpvmm.devicemodel.machines import build_machine, check_states
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


@pytest.mark.parametrize("name, change", [
    ("testdev", {"writes": -1}),
    ("testdev", {"reads": True}),
    ("sink", {"extra": 1}),
    ("rtc", {"ram": b"short"}),
    ("rtc", {"index": 0x80}),
    ("i8042", {"output": b"x" * 17}),
    ("i8042", {"pending_command": "0x60"}),
    ("acpi-pm", {"poweroffs": 1 << 20}),
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
