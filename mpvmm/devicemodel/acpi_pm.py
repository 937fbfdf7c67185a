"""The ACPI PM block the hardware-reduced FADT names (x86/acpi.py), a pure state machine.

Three byte-wide registers (ACPI 6.5, 4.8.3.7-4.8.3.9 and 4.8.3.6):

- sleep control (offset 0, write-only, reads 0): SLP_EN with SLP_TYP 5,
  \\_S5's type, is a power-off. Other sleep types are not in the DSDT, so a
  guest writing one is counted and ignored.
- sleep status (offset 1): WAK_STS (bit 7) is set by a wake from a sleep
  state, write 1 to clear. Linux clears it before it sleeps; S5 ends the VM,
  so no wake ever sets it: it reads 0 and the clear is accepted.
- reset (offset 2, write-only): the FADT's reset value is a reboot.

Events go to an injected ``on_event(name)``.
"""

from __future__ import annotations

from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS
from mpvmm.devicemodel.device_state import expect_keys, expect_uint
from mpvmm.x86.acpi import (
    RESET_OFFSET,
    RESET_VALUE,
    SLEEP_CONTROL_OFFSET,
    SLEEP_STATUS_OFFSET,
    SLEEP_TYPE_S5,
    SLP_EN,
    SLP_TYP_MASK,
    SLP_TYP_SHIFT,
    WAK_STS,
)

EVENT_POWEROFF = "poweroff"
EVENT_REBOOT = "reboot"
ALL_ONES_BYTE = 0xFF


class AcpiPm:
    # Never coalesced: a sleep or reset write must end the machine at once.
    kernel_access = NO_KERNEL_ACCESS

    def __init__(self, on_event: Callable[[str], None] | None = None):
        self._on_event = on_event or (lambda name: None)
        self.events: list[str] = []
        self.ignored_writes = 0

    def read(self, offset: int, size: int) -> int:
        if size != 1:
            return (1 << (8 * size)) - 1  # byte registers: wider reads hit nothing
        if offset in (SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET, RESET_OFFSET):
            return 0  # write-only, or (sleep status) no wake has happened
        return ALL_ONES_BYTE

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if size != 1:
            self.ignored_writes += 1
        elif offset == SLEEP_CONTROL_OFFSET:
            self._sleep_control(value)
        elif offset == SLEEP_STATUS_OFFSET and value & ~WAK_STS == 0:
            pass  # clearing WAK_STS, which is never set
        elif offset == RESET_OFFSET and value == RESET_VALUE:
            self._event(EVENT_REBOOT)
        else:
            self.ignored_writes += 1

    def _sleep_control(self, value: int) -> None:
        if not value & SLP_EN:
            return  # SLP_TYP alone does nothing until SLP_EN
        if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLEEP_TYPE_S5:
            self._event(EVENT_POWEROFF)
        else:
            self.ignored_writes += 1

    def _event(self, name: str) -> None:
        self.events.append(name)
        self._on_event(name)

    def stats(self) -> dict[str, int]:
        return {"poweroffs": self.events.count(EVENT_POWEROFF), "reboots": self.events.count(EVENT_REBOOT),
                "ignored_writes": self.ignored_writes}

    # No register holds anything between accesses (WAK_STS is never set): the state is the counts.
    def state(self) -> dict[str, int]:
        return self.stats()

    @classmethod
    def from_state(cls, state: object, on_event: Callable[[str], None] | None = None) -> "AcpiPm":
        expect_keys(state, ("poweroffs", "reboots", "ignored_writes"), "acpi-pm")
        pm = cls(on_event)
        pm.events = ([EVENT_POWEROFF] * expect_uint(state["poweroffs"], 16, "acpi-pm poweroffs")
                     + [EVENT_REBOOT] * expect_uint(state["reboots"], 16, "acpi-pm reboots"))
        pm.ignored_writes = expect_uint(state["ignored_writes"], 64, "acpi-pm ignored writes")
        return pm
