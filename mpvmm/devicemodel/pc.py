"""The PC devices a Linux guest needs on top of the standard machine.

``build_pc_buses`` is ``machine.build_buses`` plus the CMOS RTC, the i8042
and the ACPI sleep/reset registers. Interrupts reach the guest through
eventfds the supervisor registered with KVM_IRQFD: a write of 1 to the
eventfd pulses the GSI, an edge on the IOAPIC pin (ISA IRQs are
edge-triggered in our MADT and MP table). The 8250's interrupt is a level
in hardware; an edge per newly *appearing* condition, which serial.py's
``_update_interrupt`` gives (a THR-empty after the guest's IIR read
acknowledged the last one, data arriving ...), is what the level would have
signalled, since Linux's 8250 handler reads IIR until nothing is pending.
Power-off and reboot go to ``on_event(name)``: the process turns them into
``system_event`` control messages for the supervisor.
"""

from __future__ import annotations

import os
from typing import Callable

from mpvmm.devicemodel.acpi_pm import AcpiPm
from mpvmm.devicemodel.bus import BusRange
from mpvmm.devicemodel.i8042 import I8042
from mpvmm.devicemodel.machine import COM1_NAME, build_buses, make_device
from mpvmm.devicemodel.rtc import Rtc
from mpvmm.x86 import layout

RTC_NAME = "rtc"
I8042_NAME = "i8042"
ACPI_PM_NAME = "acpi-pm"
I8042_PORT_COUNT = layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT + 1
# irqfd names in the configure message, and the GSI each is registered on:
# the one IRQ map of the PC machine (the supervisor registers these irqfds).
IRQ_LINES = {COM1_NAME: layout.COM1_IRQ, I8042_NAME: layout.I8042_IRQ, RTC_NAME: layout.RTC_IRQ}
EVENT_I8042_RESET = "reboot"
_ONE = (1).to_bytes(8, "little")


def eventfd_trigger(fd: int) -> Callable[[], None]:
    """A trigger that signals eventfd ``fd`` (OSError goes to the device's counter)."""

    def trigger() -> None:
        os.write(fd, _ONE)

    return trigger


def build_pc_buses(
    console_out: Callable[[bytes], None] | None,
    triggers: dict[str, Callable[[], None]],
    on_event: Callable[[str], None],
    states: dict | None = None,
):
    pio, mmio, devices = build_buses(console_out, triggers.get(COM1_NAME), states)
    rtc = make_device(Rtc, states, RTC_NAME, trigger=triggers.get(RTC_NAME))
    i8042 = make_device(I8042, states, I8042_NAME, reset=lambda: on_event(EVENT_I8042_RESET),
                        trigger=triggers.get(I8042_NAME))
    acpi_pm = make_device(AcpiPm, states, ACPI_PM_NAME, on_event=on_event)
    pio.insert(BusRange(layout.RTC_PORT, layout.RTC_PORT_COUNT), rtc, RTC_NAME)
    # 0x61 between them is the PIT's speaker port, answered in the kernel.
    pio.insert(BusRange(layout.I8042_DATA_PORT, I8042_PORT_COUNT), i8042, I8042_NAME)
    pio.insert(BusRange(layout.ACPI_PM_PORT, layout.ACPI_PM_PORT_COUNT), acpi_pm, ACPI_PM_NAME)
    devices.update({RTC_NAME: rtc, I8042_NAME: i8042, ACPI_PM_NAME: acpi_pm})
    return pio, mmio, devices
