"""The MC146818 CMOS RTC at ports 0x70/0x71, a pure state machine.

The guest writes a register index to 0x70 (bit 7 is the NMI mask, ignored)
and reads or writes the register at 0x71. The time registers show the host
clock (UTC, from an injected ``clock()``) in the format status register B
selects, BCD or binary, always 24-hour; writes to them are ignored (the
guest cannot set the host's clock). The other bytes are plain CMOS RAM:
Linux writes the shutdown status (0x0F) while starting APs.

Interrupts (IRQ 8, through an injected ``trigger()``): an update cycle ends
at every whole second of the clock, which sets UF in status register C, and
AF too when the time matches the alarm registers (0xC0-0xFF in one is
"any"). With UIE or AIE set in register B the matching flag also sets IRQF
and raises the interrupt, once per rise of IRQF; reading register C returns
the flags and clears them. ``timer_deadline()`` says when the next update
cycle ends while an interrupt is enabled, and the device-model process calls
``on_timer()`` then; reads of C bring the flags up to the clock without it.
Linux's rtc-cmos uses the alarm (its RTC core emulates update and periodic
interrupts on top of alarms and hrtimers), so periodic interrupts (PIE) are
not modelled: PF never sets.
"""

from __future__ import annotations

import time
from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS
from mpvmm.devicemodel.device_state import expect_bytes, expect_keys, expect_uint
from mpvmm.errors import DeviceModelError

INDEX_OFFSET = 0
DATA_OFFSET = 1
INDEX_MASK = 0x7F  # bit 7 of the index port masks NMIs on a PC
CMOS_SIZE = 128

REG_SECONDS, REG_SECONDS_ALARM, REG_MINUTES, REG_MINUTES_ALARM = 0x00, 0x01, 0x02, 0x03
REG_HOURS, REG_HOURS_ALARM = 0x04, 0x05
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_STATUS_A, REG_STATUS_B, REG_STATUS_C, REG_STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32  # where the ACPI FADT's century field points (x86/acpi.py)
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)
# Each alarm register, and the time register it is compared with.
ALARMS = ((REG_SECONDS_ALARM, REG_SECONDS), (REG_MINUTES_ALARM, REG_MINUTES), (REG_HOURS_ALARM, REG_HOURS))
ALARM_ANY = 0xC0  # both top bits set: "don't care"
SECONDS_PER_DAY = 86400

STATUS_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set
STATUS_B_UIE = 0x10  # update-ended interrupt enable
STATUS_B_AIE = 0x20  # alarm interrupt enable
STATUS_B_PIE = 0x40  # periodic interrupt enable (not modelled)
STATUS_B_24H = 0x02
STATUS_B_BINARY = 0x04  # data mode: binary instead of BCD
STATUS_B_DEFAULT = STATUS_B_24H
STATUS_C_UF = 0x10  # an update cycle ended
STATUS_C_AF = 0x20  # the alarm time was reached
STATUS_C_IRQF = 0x80  # an enabled flag is set: the interrupt line is asserted
STATUS_D_VALID = 0x80  # "the battery is fine, RAM and time are valid"


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _no_trigger() -> None:
    pass


class Rtc:
    """CMOS RAM, clock and alarm; ``read``/``write`` take offsets from port 0x70."""

    # Never coalesced: a write selects the register the next read answers.
    kernel_access = NO_KERNEL_ACCESS

    def __init__(self, clock: Callable[[], float] = time.time, trigger: Callable[[], None] | None = None):
        self._clock = clock
        self._trigger = trigger or _no_trigger
        self.index = 0
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_STATUS_A] = STATUS_A_DEFAULT
        self.ram[REG_STATUS_B] = STATUS_B_DEFAULT
        self.ram[REG_STATUS_D] = STATUS_D_VALID
        self.flags = 0  # register C
        self._last_update = int(clock())  # the second whose update cycle ran last
        self.reads = 0
        self.writes = 0
        self.interrupts = 0

    # --- Guest accesses. ---

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        if offset != DATA_OFFSET or size != 1:
            return (1 << (8 * size)) - 1  # the index port is write-only
        if self.index in TIME_REGISTERS:
            return self._time_register(self.index, time.gmtime(self._clock()))
        if self.index == REG_STATUS_C:
            self.on_timer()
            flags, self.flags = self.flags, 0
            return flags
        return self.ram[self.index]

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        value &= 0xFF
        if offset == INDEX_OFFSET:
            self.index = value & INDEX_MASK
        elif offset == DATA_OFFSET:
            if self.index in TIME_REGISTERS or self.index in (REG_STATUS_C, REG_STATUS_D):
                return  # the host's clock and the read-only status registers
            if self.index == REG_STATUS_B:
                self.on_timer()  # flags up to now before the enables change
                value |= STATUS_B_24H  # 12-hour mode is not modelled
                self.ram[self.index] = value
                self._update_irqf()
                return
            self.ram[self.index] = value

    # --- Time. ---

    def timer_deadline(self) -> float | None:
        """When the next update cycle ends, if an interrupt waits for it; None otherwise."""
        if self.ram[REG_STATUS_B] & (STATUS_B_UIE | STATUS_B_AIE):
            return float(self._last_update + 1)
        return None

    def on_timer(self) -> None:
        """Run the update cycles that ended since the last call: UF, and AF on a matching second."""
        now = int(self._clock())
        if now <= self._last_update:
            return
        self.flags |= STATUS_C_UF
        if self._alarm_between(self._last_update, now):
            self.flags |= STATUS_C_AF
        self._last_update = now
        self._update_irqf()

    def _alarm_between(self, after: int, until: int) -> bool:
        """Whether the alarm matches a second in (after, until]; any time of day recurs within a day."""
        first = max(after + 1, until - SECONDS_PER_DAY + 1)
        return any(self._alarm_matches(time.gmtime(second)) for second in range(first, until + 1))

    def _alarm_matches(self, now: time.struct_time) -> bool:
        for alarm, register in ALARMS:
            wanted = self.ram[alarm]
            if wanted & ALARM_ANY != ALARM_ANY and wanted != self._time_register(register, now):
                return False
        return True

    def _update_irqf(self) -> None:
        enabled = self.ram[REG_STATUS_B]
        asserted = ((self.flags & STATUS_C_UF and enabled & STATUS_B_UIE)
                    or (self.flags & STATUS_C_AF and enabled & STATUS_B_AIE))
        if asserted and not self.flags & STATUS_C_IRQF:
            self.flags |= STATUS_C_IRQF
            self.interrupts += 1
            try:
                self._trigger()
            except OSError:
                pass  # the eventfd is gone: the VM is ending

    def _time_register(self, register: int, now: time.struct_time) -> int:
        value = {
            REG_SECONDS: now.tm_sec,
            REG_MINUTES: now.tm_min,
            REG_HOURS: now.tm_hour,
            REG_WEEKDAY: (now.tm_wday + 1) % 7 + 1,  # 1 = Sunday
            REG_DAY: now.tm_mday,
            REG_MONTH: now.tm_mon,
            REG_YEAR: now.tm_year % 100,
            REG_CENTURY: now.tm_year // 100,
        }[register]
        return value if self.ram[REG_STATUS_B] & STATUS_B_BINARY else _bcd(value)

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes, "interrupts": self.interrupts}

    # The time registers are not state: they always show the host's clock.
    # Register C (a pending alarm or update flag, and IRQF) is, and so is the
    # second whose update cycle ran last: cycles that end while the machine is
    # saved run at its first timer or read of C after the restore, as a
    # battery-backed RTC's would have.
    _STATE_KEYS = ("index", "ram", "flags", "last_update", "reads", "writes", "interrupts")

    def state(self) -> dict:
        return {"index": self.index, "ram": bytes(self.ram), "flags": self.flags,
                "last_update": self._last_update, "reads": self.reads, "writes": self.writes,
                "interrupts": self.interrupts}

    @classmethod
    def from_state(cls, state: object, clock: Callable[[], float] = time.time,
                   trigger: Callable[[], None] | None = None) -> "Rtc":
        expect_keys(state, cls._STATE_KEYS, "rtc")
        rtc = cls(clock, trigger)
        rtc.index = expect_uint(state["index"], 7, "rtc index")
        ram = expect_bytes(state["ram"], CMOS_SIZE, "rtc ram")
        if len(ram) != CMOS_SIZE:
            raise DeviceModelError(f"rtc ram must be {CMOS_SIZE} bytes")
        rtc.ram[:] = ram
        rtc.flags = expect_uint(state["flags"], 8, "rtc flags")
        # IRQF was raised before the save; the interrupt controller's saved state holds that edge.
        # A host whose clock is behind the saved one starts counting update cycles from its own now.
        rtc._last_update = min(expect_uint(state["last_update"], 64, "rtc last update"), rtc._last_update)
        rtc.reads, rtc.writes, rtc.interrupts = (expect_uint(state[key], 64, f"rtc {key}")
                                                 for key in ("reads", "writes", "interrupts"))
        return rtc
