"""The RTC's update and alarm interrupts, driven by an injected clock."""

import calendar

from mpvmm.devicemodel import rtc

# 2024-02-29 23:59:58 UTC.
WHEN = calendar.timegm((2024, 2, 29, 23, 59, 58, 0, 0, 0))


class _Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Trigger:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def _rtc(now=WHEN + 0.25):
    clock, trigger = _Clock(now), _Trigger()
    return rtc.Rtc(clock=clock, trigger=trigger), clock, trigger


def _set(device, register, value):
    device.write(rtc.INDEX_OFFSET, 1, register)
    device.write(rtc.DATA_OFFSET, 1, value)


def _get(device, register):
    device.write(rtc.INDEX_OFFSET, 1, register)
    return device.read(rtc.DATA_OFFSET, 1)


def test_no_interrupt_and_no_timer_while_none_is_enabled():
    device, clock, trigger = _rtc()
    assert device.timer_deadline() is None
    clock.now += 1  # 23:59:59: not yet the alarm registers' default, 00:00:00
    device.on_timer()
    assert trigger.calls == 0
    assert _get(device, rtc.REG_STATUS_C) == rtc.STATUS_C_UF  # the flag sets anyway, without IRQF
    assert _get(device, rtc.REG_STATUS_C) == 0  # reading C cleared it


def test_update_interrupt_once_per_second_while_c_is_read():
    device, clock, trigger = _rtc()
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_UIE)
    assert device.timer_deadline() == WHEN + 1  # the next whole second
    clock.now = WHEN + 1.0
    device.on_timer()
    assert trigger.calls == 1
    clock.now = WHEN + 1.5
    device.on_timer()  # the same second: nothing new
    assert trigger.calls == 1
    assert _get(device, rtc.REG_STATUS_C) == rtc.STATUS_C_IRQF | rtc.STATUS_C_UF
    assert device.timer_deadline() == WHEN + 2
    clock.now = WHEN + 2.0
    device.on_timer()
    assert trigger.calls == 2


def test_the_line_stays_asserted_until_c_is_read():
    """IRQF is the level of the interrupt line: no new edge until the guest reads C."""
    device, clock, trigger = _rtc()
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_UIE)
    for second in (1, 2, 3):
        clock.now = WHEN + second
        device.on_timer()
    assert trigger.calls == 1
    _get(device, rtc.REG_STATUS_C)
    clock.now = WHEN + 4
    device.on_timer()
    assert trigger.calls == 2


def test_alarm_interrupt_at_the_matching_second_in_bcd():
    device, clock, trigger = _rtc()
    # Alarm at 00:00:01 the next day (BCD, the default data mode).
    for register, value in ((rtc.REG_HOURS_ALARM, 0x00), (rtc.REG_MINUTES_ALARM, 0x00), (rtc.REG_SECONDS_ALARM, 0x01)):
        _set(device, register, value)
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_AIE)
    _get(device, rtc.REG_STATUS_C)
    for second in (1, 2):  # 23:59:59, 00:00:00: update cycles, no alarm
        clock.now = WHEN + second
        device.on_timer()
    assert trigger.calls == 0
    assert _get(device, rtc.REG_STATUS_C) == rtc.STATUS_C_UF
    clock.now = WHEN + 3  # 00:00:01
    device.on_timer()
    assert trigger.calls == 1
    assert _get(device, rtc.REG_STATUS_C) == rtc.STATUS_C_IRQF | rtc.STATUS_C_AF | rtc.STATUS_C_UF


def test_alarm_dont_care_fields_and_binary_mode():
    device, clock, trigger = _rtc()
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_BINARY)
    _set(device, rtc.REG_HOURS_ALARM, rtc.ALARM_ANY)
    _set(device, rtc.REG_MINUTES_ALARM, 0xFF)
    _set(device, rtc.REG_SECONDS_ALARM, 30)  # every minute at :30, binary
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_BINARY | rtc.STATUS_B_AIE)
    clock.now = WHEN + 31  # 00:00:29
    device.on_timer()
    assert trigger.calls == 0
    clock.now = WHEN + 32  # 00:00:30
    device.on_timer()
    assert trigger.calls == 1


def test_an_alarm_passed_while_nobody_looked_is_still_flagged():
    """Reads of C bring the flags up to the clock, over every second since the last update."""
    device, clock, _ = _rtc()
    _set(device, rtc.REG_SECONDS_ALARM, 0x10)
    _set(device, rtc.REG_MINUTES_ALARM, rtc.ALARM_ANY)
    _set(device, rtc.REG_HOURS_ALARM, rtc.ALARM_ANY)
    _get(device, rtc.REG_STATUS_C)
    clock.now = WHEN + 600
    assert _get(device, rtc.REG_STATUS_C) == rtc.STATUS_C_AF | rtc.STATUS_C_UF  # no IRQF: AIE is off
    clock.now = WHEN + 600 + 2 * rtc.SECONDS_PER_DAY  # a long idle: checked over one day only
    assert _get(device, rtc.REG_STATUS_C) & rtc.STATUS_C_AF


def test_enabling_an_interrupt_with_its_flag_already_set_raises_it():
    device, clock, trigger = _rtc()
    clock.now = WHEN + 1
    device.on_timer()  # UF set while UIE is off
    assert trigger.calls == 0
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_UIE)
    assert trigger.calls == 1
    assert device.stats()["interrupts"] == 1


def test_a_clock_that_goes_back_runs_no_update_cycle():
    device, clock, trigger = _rtc()
    _set(device, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_UIE)
    clock.now = WHEN - 100
    device.on_timer()
    assert trigger.calls == 0 and _get(device, rtc.REG_STATUS_C) == 0
