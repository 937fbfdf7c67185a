"""The MC146818 CMOS RTC at ports 0x70/0x71, a pure state machine.

The guest writes a register index to 0x70 (bit 7 is the NMI mask, ignored)
and reads or writes the register at 0x71. The time registers show the host
clock (UTC, from an injected ``clock()``) in the format status register B
selects, BCD or binary, always 24-hour; writes to them are ignored (the
guest cannot set the host's clock). The other bytes are plain CMOS RAM:
Linux writes the shutdown status (0x0F) while starting APs.
"""

from __future__ import annotations

import time
from typing import Callable

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS

INDEX_OFFSET = 0
DATA_OFFSET = 1
INDEX_MASK = 0x7F  # bit 7 of the index port masks NMIs on a PC
CMOS_SIZE = 128

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_STATUS_A, REG_STATUS_B, REG_STATUS_C, REG_STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32  # where the ACPI FADT's default century field points
TIME_REGISTERS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)

STATUS_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) never set
STATUS_B_24H = 0x02
STATUS_B_BINARY = 0x04  # data mode: binary instead of BCD
STATUS_B_DEFAULT = STATUS_B_24H
STATUS_D_VALID = 0x80  # "the battery is fine, RAM and time are valid"


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Rtc:
    """CMOS RAM and clock; ``read``/``write`` take offsets from port 0x70."""

    # Never coalesced: a write selects the register the next read answers.
    kernel_access = NO_KERNEL_ACCESS

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.index = 0
        self.ram = bytearray(CMOS_SIZE)
        self.ram[REG_STATUS_A] = STATUS_A_DEFAULT
        self.ram[REG_STATUS_B] = STATUS_B_DEFAULT
        self.ram[REG_STATUS_D] = STATUS_D_VALID
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        if offset != DATA_OFFSET or size != 1:
            return (1 << (8 * size)) - 1  # the index port is write-only
        if self.index in TIME_REGISTERS:
            return self._time_register(self.index)
        if self.index == REG_STATUS_C:
            return 0  # no interrupt flags: we raise no RTC interrupts
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
                value |= STATUS_B_24H  # 12-hour mode is not modelled
            self.ram[self.index] = value

    def _time_register(self, register: int) -> int:
        now = time.gmtime(self._clock())
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
        return {"reads": self.reads, "writes": self.writes}
