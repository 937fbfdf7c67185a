"""The ACPI hardware-reduced sleep and reset registers the FADT names (x86/acpi.py).

Offset 0 is the sleep control register: SLP_EN with SLP_TYP 5 (S5, soft
off) is a power-off. Offset 1 is the sleep status register (reads 0: we
never wake). Offset 2 is the reset register: the FADT's reset value there
is a reboot. Both events go to an injected ``on_event(name)``.
"""

from __future__ import annotations

from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS

SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = 1
RESET_OFFSET = 2
SLP_EN = 0x20
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7
SLP_TYP_S5 = 5
RESET_VALUE = 1

EVENT_POWEROFF = "poweroff"
EVENT_REBOOT = "reboot"


class AcpiPm:
    # Never coalesced: a sleep or reset write must end the machine at once.
    kernel_access = NO_KERNEL_ACCESS

    def __init__(self, on_event: Callable[[str], None] | None = None):
        self._on_event = on_event or (lambda name: None)
        self.events: list[str] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == SLEEP_CONTROL_OFFSET and value & SLP_EN:
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == SLP_TYP_S5:
                self._event(EVENT_POWEROFF)
        elif offset == RESET_OFFSET and value == RESET_VALUE:
            self._event(EVENT_REBOOT)

    def _event(self, name: str) -> None:
        self.events.append(name)
        self._on_event(name)

    def stats(self) -> dict[str, int]:
        return {"poweroffs": self.events.count(EVENT_POWEROFF), "reboots": self.events.count(EVENT_REBOOT)}
