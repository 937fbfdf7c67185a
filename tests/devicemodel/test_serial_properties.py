"""Property tests: no sequence of guest accesses and host input breaks the UART."""

from hypothesis import given, settings
from hypothesis import strategies as st

from mpvmm.devicemodel import serial

accesses = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(0, 7), st.sampled_from([1, 2, 4])),
        st.tuples(st.just("write"), st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("input"), st.binary(max_size=100)),
    ),
    max_size=200,
)


@settings(max_examples=400)
@given(accesses)
def test_any_access_sequence_keeps_the_uart_consistent(sequence):
    output = bytearray()
    triggers = []
    uart = serial.Serial(trigger=lambda: triggers.append(1), out=output.extend)
    for step in sequence:
        if step[0] == "read":
            _, offset, size = step
            value = uart.read(offset, size)
            assert 0 <= value < 1 << (8 * size)
        elif step[0] == "write":
            _, offset, size, value = step
            uart.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            accepted = uart.enqueue_raw_bytes(step[1])
            assert 0 <= accepted <= len(step[1])
        # The receive FIFO never exceeds its 64 bytes, whatever the guest or host do.
        assert len(uart.state()["fifo"]) <= serial.FIFO_SIZE
        lsr = uart.read(serial.LSR_OFFSET, 1) if uart.line_control & serial.LCR_DLAB_BIT == 0 else None
        if lsr is not None:
            assert lsr & serial.LSR_THR_EMPTY_BIT  # output is instant: THR is always free
            assert bool(lsr & serial.LSR_DATA_READY_BIT) == (len(uart.state()["fifo"]) > 0)
    # Every byte that left went through THR; the counters agree with the stream.
    assert uart.events.out_bytes == len(output)
    # A snapshot rebuilds the same UART.
    assert serial.Serial.from_state(uart.state()).state() == uart.state()
