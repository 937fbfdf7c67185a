"""The migration stream over a real socket pair: records, pages into guest RAM, a passed fd, and faults."""

import os
import socket
import struct
import threading

import pytest

from mpvmm.errors import MigrationError
from mpvmm.migration.stream import Stream
from mpvmm.snapshot import records
from mpvmm.supervisor.guest_memory import GuestMemory

PAGE = 4096


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    source, destination = Stream(a, "destination"), Stream(b, "source")
    yield source, destination
    source.close()
    destination.close()


@pytest.fixture
def memories():
    with GuestMemory(1 << 20) as sent, GuestMemory(1 << 20) as received:
        yield sent, received


def test_messages_go_both_ways(pair):
    source, destination = pair
    source.send(records.HELLO, {"version": 1})
    assert destination.expect(records.HELLO) == (records.HELLO, {"version": 1})
    destination.send(records.READY, {})
    assert source.expect(records.READY) == (records.READY, {})


def test_pages_land_in_guest_ram(pair, memories):
    source, destination = pair
    sent, received = memories
    sent.write(0x3000, b"\x5a" * (2 * PAGE))
    source.send_pages(0x3000, sent.host_address, 2 * PAGE)
    kind, length, checksum = destination.receive_header()
    assert kind == records.PAGES
    assert destination.receive_pages(length, checksum, received) == 2 * PAGE
    assert received.read(0x3000, 2 * PAGE) == sent.read(0x3000, 2 * PAGE)
    assert received.read(0x2000, PAGE) == bytes(PAGE)


def test_corrupt_pages_are_refused(pair, memories):
    source, destination = pair
    _sent, received = memories
    prefix = records.PAGE_OFFSET.pack(0x1000)
    data = b"\x01" * PAGE
    checksum = records.crc32(data, records.crc32(prefix)) ^ 1
    source.sock.sendall(records.header(records.PAGES, len(prefix) + PAGE, checksum) + prefix + data)
    kind, length, checksum = destination.receive_header()
    with pytest.raises(MigrationError, match="corrupt migration stream from the source: the pages at 0x1000 fail"):
        destination.receive_pages(length, checksum, received)


def test_pages_outside_guest_ram_are_refused(pair, memories):
    source, destination = pair
    _sent, received = memories
    prefix = records.PAGE_OFFSET.pack(received.size)
    source.sock.sendall(records.header(records.PAGES, len(prefix) + PAGE, 0) + prefix + bytes(PAGE))
    kind, length, checksum = destination.receive_header()
    with pytest.raises(MigrationError, match="not whole pages of the guest"):
        destination.receive_pages(length, checksum, received)


def test_garbage_is_a_corrupt_stream(pair):
    source, destination = pair
    source.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(MigrationError, match="corrupt migration stream from the source"):
        destination.receive_header()


def test_a_record_out_of_turn_is_refused(pair):
    source, destination = pair
    source.send(records.DONE, {})
    with pytest.raises(MigrationError, match="sent a done record where hello was due"):
        destination.expect(records.HELLO)


def test_a_cancel_is_the_peers_error(pair):
    source, destination = pair
    destination.send(records.CANCEL, {"reason": "out of memory"})
    with pytest.raises(MigrationError, match="the destination gave up: out of memory"):
        source.expect(records.READY)


def test_a_closed_peer_mid_record_is_an_error(pair):
    source, destination = pair
    source.sock.sendall(struct.pack("<HHII", records.MACHINE, 0, 100, 0) + b"x" * 10)
    source.sock.close()
    kind, length, checksum = destination.receive_header()
    with pytest.raises(MigrationError, match="the source closed the connection"):
        destination.receive_message(kind, length, checksum)


def test_a_reason_to_stop_ends_the_wait():
    a, b = socket.socketpair()
    flag = threading.Event()
    destination = Stream(b, "source", lambda: "stopped by SIGINT" if flag.is_set() else None)
    threading.Timer(0.2, flag.set).start()
    try:
        with pytest.raises(MigrationError, match="stopped by SIGINT"):
            destination.receive_header()
    finally:
        a.close()
        destination.close()


def test_a_file_descriptor_travels_with_its_record(pair, memories):
    source, destination = pair
    sent, _received = memories
    sent.write(0x100, b"shared")
    source.send_with_fd(records.HELLO, {"memory": "fd"}, sent.fd)
    assert destination.expect(records.HELLO)[1] == {"memory": "fd"}
    fd = destination.take_fd()
    assert fd is not None and fd != sent.fd
    with GuestMemory.adopt(fd, sent.size) as same:
        assert same.read(0x100, 6) == b"shared"
        same.write(0x200, b"both ways")
        assert sent.read(0x200, 9) == b"both ways"
    assert destination.take_fd() is None


def test_an_adopted_fd_of_the_wrong_size_is_refused(memories):
    sent, _received = memories
    fd = os.dup(sent.fd)
    with pytest.raises(Exception, match="holds 1048576 bytes, not the 4096 announced"):
        GuestMemory.adopt(fd, 4096)
