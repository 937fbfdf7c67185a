import pytest

from mpvmm.devicemodel import serial as s
from mpvmm.devicemodel.serial import Serial, SerialEvents
from mpvmm.errors import DeviceModelError


class Recorder:
    def __init__(self):
        self.triggers = 0
        self.output = bytearray()

    def trigger(self):
        self.triggers += 1

    def out(self, data):
        self.output += data


def make():
    rec = Recorder()
    return Serial(trigger=rec.trigger, out=rec.out), rec


def rd(uart, offset):
    return uart.read(offset, 1)


def wr(uart, offset, value):
    uart.write(offset, 1, value)


def test_power_on_registers():
    uart, _ = make()
    assert rd(uart, s.IER_OFFSET) == 0
    assert rd(uart, s.IIR_OFFSET) == s.IIR_FIFO_BITS | s.IIR_NONE
    assert rd(uart, s.LCR_OFFSET) == s.DEFAULT_LINE_CONTROL
    assert rd(uart, s.MCR_OFFSET) == s.MCR_OUT2_BIT
    assert rd(uart, s.LSR_OFFSET) == s.LSR_THR_EMPTY_BIT | s.LSR_IDLE_BIT
    assert rd(uart, s.MSR_OFFSET) == s.MSR_CTS_BIT | s.MSR_DSR_BIT | s.MSR_DCD_BIT
    assert rd(uart, s.DATA_OFFSET) == 0  # empty FIFO reads 0
    assert uart.baud_divisor == 12 and uart.baud_rate == 9600


def test_dlab_switches_offsets_0_and_1_to_the_divisor():
    uart, rec = make()
    wr(uart, s.IER_OFFSET, s.IER_RDA_BIT)
    wr(uart, s.LCR_OFFSET, s.LCR_DLAB_BIT | 0x03)
    wr(uart, s.DLL_OFFSET, 0x01)
    wr(uart, s.DLM_OFFSET, 0x00)
    assert rd(uart, s.DLL_OFFSET) == 0x01 and rd(uart, s.DLM_OFFSET) == 0x00
    assert uart.baud_divisor == 1 and uart.baud_rate == 115200
    assert rec.output == b""  # the DLL write was not a transmitted byte
    wr(uart, s.LCR_OFFSET, 0x03)
    assert rd(uart, s.IER_OFFSET) == s.IER_RDA_BIT  # IER untouched by DLM
    wr(uart, s.DATA_OFFSET, ord("x"))
    assert rec.output == b"x"
    wr(uart, s.LCR_OFFSET, s.LCR_DLAB_BIT)
    wr(uart, s.DLL_OFFSET, 0)
    assert uart.baud_rate == 0  # a zero divisor: no rate, no crash


def test_output_bytes_and_counters():
    uart, rec = make()
    for byte in b"hello\n":
        wr(uart, s.DATA_OFFSET, byte)
    assert rec.output == b"hello\n"
    assert uart.events.out_bytes == 6
    assert uart.stats()["out_bytes"] == 6


def test_output_failure_counts_lost_bytes():
    def broken(data):
        raise BrokenPipeError

    uart = Serial(out=broken)
    wr(uart, s.DATA_OFFSET, 0x41)
    assert uart.events.tx_lost_bytes == 1 and uart.events.out_bytes == 0


def test_ier_keeps_only_valid_bits():
    uart, _ = make()
    wr(uart, s.IER_OFFSET, 0xFF)
    assert rd(uart, s.IER_OFFSET) == s.IER_VALID_BITS


def test_thr_empty_interrupt_on_enable_and_after_each_acknowledged_write():
    uart, rec = make()
    wr(uart, s.DATA_OFFSET, 0x41)
    assert rec.triggers == 0  # not enabled: no interrupt
    wr(uart, s.IER_OFFSET, s.IER_THR_EMPTY_BIT)
    assert rec.triggers == 1  # THR is empty the moment THRE is enabled
    assert rd(uart, s.IIR_OFFSET) == s.IIR_FIFO_BITS | s.IIR_THR_EMPTY
    assert rd(uart, s.IIR_OFFSET) == s.IIR_FIFO_BITS | s.IIR_NONE  # read acknowledged it
    wr(uart, s.DATA_OFFSET, 0x42)
    assert rec.triggers == 2
    wr(uart, s.DATA_OFFSET, 0x43)
    assert rec.triggers == 2  # still pending, not acknowledged: no new edge
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_THR_EMPTY
    wr(uart, s.DATA_OFFSET, 0x44)
    assert rec.triggers == 3
    assert uart.events.interrupts == 3


def test_rda_interrupt_has_priority_and_clears_when_fifo_empties():
    uart, rec = make()
    wr(uart, s.IER_OFFSET, s.IER_RDA_BIT | s.IER_THR_EMPTY_BIT)
    assert rec.triggers == 1  # THRE
    assert uart.enqueue_raw_bytes(b"ab") == 2
    assert rec.triggers == 2  # received data appeared
    assert rd(uart, s.LSR_OFFSET) & s.LSR_DATA_READY_BIT
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_RDA  # RDA before THRE
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_RDA  # level: stays until read
    assert rd(uart, s.DATA_OFFSET) == ord("a")
    assert uart.enqueue_raw_bytes(b"c") == 1
    assert rec.triggers == 2  # data was already available: no new condition
    assert rd(uart, s.DATA_OFFSET) == ord("b")
    assert rd(uart, s.DATA_OFFSET) == ord("c")
    assert not rd(uart, s.LSR_OFFSET) & s.LSR_DATA_READY_BIT
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_THR_EMPTY
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_NONE
    assert uart.events.in_bytes == 3


def test_enabling_rda_with_data_waiting_raises_it():
    uart, rec = make()
    uart.enqueue_raw_bytes(b"z")
    assert rec.triggers == 0
    wr(uart, s.IER_OFFSET, s.IER_RDA_BIT)
    assert rec.triggers == 1


def test_no_interrupts_when_disabled():
    uart, rec = make()
    uart.enqueue_raw_bytes(b"abc")
    for byte in b"xyz":
        wr(uart, s.DATA_OFFSET, byte)
    assert rec.triggers == 0
    assert rd(uart, s.IIR_OFFSET) & 0x0F == s.IIR_NONE


def test_trigger_oserror_is_counted_not_raised():
    def failing():
        raise OSError(9, "bad fd")

    uart = Serial(trigger=failing)
    wr(uart, s.IER_OFFSET, s.IER_THR_EMPTY_BIT)
    assert uart.events.trigger_errors == 1 and uart.events.interrupts == 1


def test_fifo_is_capped_at_64_bytes():
    uart, _ = make()
    assert uart.enqueue_raw_bytes(bytes(range(100))) == s.FIFO_SIZE == 64
    assert uart.fifo_capacity() == 0
    assert uart.enqueue_raw_bytes(b"more") == 0
    assert uart.events.in_bytes == 64 and uart.events.in_refused_bytes == 40
    assert rd(uart, s.DATA_OFFSET) == 0
    assert uart.fifo_capacity() == 1
    assert uart.enqueue_raw_bytes(b"\xfe\xff") == 1
    received = [rd(uart, s.DATA_OFFSET) for _ in range(64)]
    assert received == list(range(1, 64)) + [0xFE]
    assert uart.enqueue_raw_bytes(b"") == 0


def test_fcr_clears_the_receive_fifo():
    uart, _ = make()
    uart.enqueue_raw_bytes(b"junk")
    wr(uart, s.FCR_OFFSET, 0x01 | s.FCR_CLEAR_RX_BIT)
    assert not rd(uart, s.LSR_OFFSET) & s.LSR_DATA_READY_BIT
    assert uart.fifo_capacity() == 64


def test_loopback_linux_probe():
    uart, rec = make()
    # drivers/tty/serial/8250/8250_port.c autoconfig(): LOOP|RTS|OUT2 -> CTS|DCD
    wr(uart, s.MCR_OFFSET, s.MCR_LOOP_BIT | 0x0A)
    assert rd(uart, s.MSR_OFFSET) & 0xF0 == 0x90
    wr(uart, s.MCR_OFFSET, s.MCR_LOOP_BIT | 0x0F)
    assert rd(uart, s.MSR_OFFSET) == 0xF0
    wr(uart, s.MCR_OFFSET, s.MCR_LOOP_BIT)
    assert rd(uart, s.MSR_OFFSET) == 0
    wr(uart, s.MCR_OFFSET, 0xFF)
    assert rd(uart, s.MCR_OFFSET) == s.MCR_VALID_BITS


def test_loopback_data_goes_to_the_receive_fifo():
    uart, rec = make()
    wr(uart, s.IER_OFFSET, s.IER_RDA_BIT)
    wr(uart, s.MCR_OFFSET, s.MCR_LOOP_BIT)
    wr(uart, s.DATA_OFFSET, 0x55)
    assert rec.output == b""
    assert rec.triggers == 1
    assert rd(uart, s.LSR_OFFSET) & s.LSR_DATA_READY_BIT
    assert rd(uart, s.DATA_OFFSET) == 0x55
    assert uart.enqueue_raw_bytes(b"x") == 0  # receiver is off the line
    assert uart.events.loopback_bytes == 1
    wr(uart, s.MCR_OFFSET, s.MCR_OUT2_BIT)
    wr(uart, s.DATA_OFFSET, 0x56)
    assert rec.output == b"\x56"


def test_loopback_overrun_sets_and_clears_lsr_oe():
    uart, _ = make()
    wr(uart, s.MCR_OFFSET, s.MCR_LOOP_BIT)
    for i in range(s.FIFO_SIZE + 3):
        wr(uart, s.DATA_OFFSET, i & 0xFF)
    assert uart.events.rx_overrun == 3
    lsr = rd(uart, s.LSR_OFFSET)
    assert lsr & s.LSR_OVERRUN_BIT and lsr & s.LSR_DATA_READY_BIT
    assert not rd(uart, s.LSR_OFFSET) & s.LSR_OVERRUN_BIT  # cleared by the read
    assert rd(uart, s.DATA_OFFSET) == 0  # the first 64 bytes were kept


def test_scratch_and_read_only_registers():
    uart, _ = make()
    wr(uart, s.SCR_OFFSET, 0xA5)
    assert rd(uart, s.SCR_OFFSET) == 0xA5
    wr(uart, s.LSR_OFFSET, 0)
    wr(uart, s.MSR_OFFSET, 0)
    assert rd(uart, s.LSR_OFFSET) == s.LSR_THR_EMPTY_BIT | s.LSR_IDLE_BIT


def test_wide_access_touches_consecutive_registers():
    uart, rec = make()
    uart.write(s.LCR_OFFSET, 2, (s.MCR_OUT2_BIT | s.MCR_RTS_BIT) << 8 | 0x03)
    assert rd(uart, s.MCR_OFFSET) == s.MCR_OUT2_BIT | s.MCR_RTS_BIT
    assert uart.read(s.LCR_OFFSET, 2) == (s.MCR_OUT2_BIT | s.MCR_RTS_BIT) << 8 | 0x03
    assert uart.read(s.SCR_OFFSET, 2) == 0xFF00  # past the last register: 0xFF
    uart.write(s.SCR_OFFSET, 4, 0xFFFFFF11)  # bytes past the end are dropped
    assert rd(uart, s.SCR_OFFSET) == 0x11


def test_state_round_trip():
    uart, _ = make()
    wr(uart, s.LCR_OFFSET, s.LCR_DLAB_BIT)
    wr(uart, s.DLL_OFFSET, 3)
    wr(uart, s.LCR_OFFSET, 0x1B)
    wr(uart, s.IER_OFFSET, s.IER_RDA_BIT | s.IER_THR_EMPTY_BIT)
    wr(uart, s.SCR_OFFSET, 0x77)
    uart.enqueue_raw_bytes(b"abc")
    state = uart.state()
    rec = Recorder()
    copy = Serial.from_state(state, trigger=rec.trigger, out=rec.out)
    assert copy.state() == state
    assert rec.triggers == 0  # restoring does not re-deliver the interrupt
    assert copy.baud_rate == 38400
    assert rd(copy, s.IIR_OFFSET) & 0x0F == s.IIR_RDA
    assert bytes(rd(copy, s.DATA_OFFSET) for _ in range(3)) == b"abc"
    assert rd(uart, s.DATA_OFFSET) == ord("a")  # the original is independent


@pytest.mark.parametrize(
    "change",
    [
        {"ier": 256},
        {"lcr": -1},
        {"fifo": bytes(65)},
        {"fifo": "abc"},
        {"extra": 1},
        {"scr": True},
    ],
)
def test_from_state_refuses_impossible_states(change):
    state = {**Serial().state(), **change}
    with pytest.raises(DeviceModelError):
        Serial.from_state(state)


def test_shared_events_record():
    events = SerialEvents()
    uart = Serial(events=events)
    wr(uart, s.DATA_OFFSET, 1)
    assert events.out_bytes == 1
