"""Terminal input for the UART on a real pty: always read, handed over in order, bounded."""

import fcntl
import os
import select
import struct
import termios
import tty

import pytest

from mpvmm.devicemodel import serial
from mpvmm.devicemodel.host_input import PENDING_MAX, HostInput
from mpvmm.devicemodel.serial import Serial


def unread(fd: int) -> int:
    """Bytes typed on the terminal that no one has read yet."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.fixture
def terminal():
    """(leader, follower) of a pty in raw mode, as the supervisor leaves a terminal, and an epoll."""
    leader, follower = os.openpty()
    tty.setraw(follower)
    os.set_blocking(leader, False)
    epoll = select.epoll()
    yield leader, follower, epoll
    epoll.close()
    for fd in (leader, follower):
        try:
            os.close(fd)
        except OSError:
            pass


def serve(host_input: HostInput, epoll: select.epoll) -> None:
    """What the device model's loop does: read whatever is readable, until nothing is."""
    while any(fd == host_input.fd for fd, _ in epoll.poll(0.2)):
        host_input.on_readable()


def guest_reads(uart: Serial, host_input: HostInput) -> bytes:
    """The guest empties the FIFO byte by byte; the device model feeds it after each access."""
    received = bytearray()
    while uart.read(serial.LSR_OFFSET, 1) & serial.LSR_DATA_READY_BIT:
        received.append(uart.read(serial.DATA_OFFSET, 1))
        host_input.feed()
    return bytes(received)


def test_everything_typed_is_read_even_with_the_fifo_full(terminal):
    """Nothing waits unread in the terminal, so its line discipline always sees a Ctrl-C."""
    leader, follower, epoll = terminal
    uart = Serial()
    host_input = HostInput(follower, uart, epoll)
    typed = bytes(range(256)) * 40  # 10 KiB: far past the FIFO and the line discipline's 4 KiB
    assert os.write(leader, typed) == len(typed)
    serve(host_input, epoll)
    assert unread(follower) == 0
    assert uart.fifo_capacity() == 0
    assert host_input.stats() == {"read_bytes": len(typed), "pending_bytes": len(typed) - serial.FIFO_SIZE,
                                  "dropped_bytes": 0}
    assert guest_reads(uart, host_input) == typed  # all of it, in order
    assert host_input.stats()["pending_bytes"] == 0


def test_input_past_the_bound_is_dropped_and_counted(terminal):
    leader, follower, epoll = terminal
    uart = Serial()
    host_input = HostInput(follower, uart, epoll)
    chunk = b"p" * 4096
    written = 0
    while written < PENDING_MAX + 3 * len(chunk):  # a paste the guest never reads
        written += os.write(leader, chunk)
        serve(host_input, epoll)
    kept = serial.FIFO_SIZE + PENDING_MAX
    assert host_input.stats() == {"read_bytes": written, "pending_bytes": PENDING_MAX,
                                  "dropped_bytes": written - kept}
    assert len(guest_reads(uart, host_input)) == kept


def test_end_of_input_leaves_the_poll_set(terminal):
    leader, follower, epoll = terminal
    host_input = HostInput(follower, Serial(), epoll)
    os.close(leader)  # the terminal hangs up: reads fail with EIO
    serve(host_input, epoll)
    assert host_input.closed
    assert epoll.poll(0) == []



def restored_uart(fifo: bytes, raised: list) -> Serial:
    """A UART rebuilt from a saved one whose guest enabled the receive interrupt, with ``fifo`` unread."""
    saved = Serial()
    saved.write(serial.IER_OFFSET, 1, serial.IER_RDA_BIT)
    saved.enqueue_raw_bytes(fifo)
    return Serial.from_state(saved.state(), trigger=lambda: raised.append(1))


def test_what_was_typed_before_a_restore_reaches_the_restored_uart_after_its_own_input(terminal):
    """Typed while a restored VM is being built, it went into the UART the device model starts
    with, which the saved one replaces: it moves over, behind what the saved UART held unread."""
    leader, follower, epoll = terminal
    first = Serial()
    host_input = HostInput(follower, first, epoll)
    typed = b"typed before the restore, longer than the sixty-four bytes of a FIFO: " * 2
    os.write(leader, typed)
    serve(host_input, epoll)
    assert first.fifo_capacity() == 0  # the first UART took what it could
    restored = restored_uart(b"unread at the snapshot ", [])
    host_input.move_to(restored)
    os.write(leader, b"and after")
    serve(host_input, epoll)
    host_input.release()
    assert guest_reads(restored, host_input) == b"unread at the snapshot " + typed + b"and after"


def test_a_restored_uart_takes_input_only_once_released(terminal):
    """Its interrupt, raised while the supervisor writes the interrupt controllers, would be lost."""
    leader, follower, epoll = terminal
    host_input = HostInput(follower, Serial(), epoll)
    raised = []
    restored = restored_uart(b"", raised)
    host_input.move_to(restored)
    os.write(leader, b"typed")
    serve(host_input, epoll)
    assert raised == [] and restored.fifo_capacity() == serial.FIFO_SIZE
    assert host_input.stats()["pending_bytes"] == len(b"typed")
    host_input.release()
    assert raised == [1]
    assert guest_reads(restored, host_input) == b"typed"
