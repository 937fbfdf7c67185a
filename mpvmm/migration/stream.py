"""One migration connection: records (snapshot/records.py) each way, guest RAM straight to and from its pages.

Sending copies a run of guest RAM once before checksumming it (the guest
may write the page meanwhile; the dirty log sends it again), receiving
reads a page record's data straight into guest RAM and checks it there.
Every read waits in short slices, so ``stop()`` (a reason to give up: a
stop signal, the run ending) is seen at once, and gives up when the peer sends nothing for
``IDLE_TIMEOUT_SECONDS``. A file descriptor (guest RAM, over a Unix
socket) travels with a record as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Callable

from mpvmm.errors import MigrationError, StateError
from mpvmm.snapshot import records
from mpvmm.snapshot.ram import view

VERSION = 1
SLICE_SECONDS = 0.1
IDLE_TIMEOUT_SECONDS = 30.0
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class Stream:
    """Records over ``sock``, for the side that calls its peer ``peer`` in messages."""

    def __init__(self, sock: socket.socket, peer: str, stop: Callable[[], str | None] = lambda: None):
        self.sock = sock
        self.peer = peer
        self.stop = stop
        self.received_fds: list[int] = []
        self.bytes_sent = 0
        sock.settimeout(SLICE_SECONDS)

    # --- Sending. ---

    def _send_all(self, parts: list) -> None:
        try:
            for part in parts:
                self.sock.settimeout(IDLE_TIMEOUT_SECONDS)
                self.sock.sendall(part)
                self.bytes_sent += len(part)
        except OSError as err:
            raise MigrationError(f"the {self.peer} went away ({err.strerror or err})") from None
        finally:
            self.sock.settimeout(SLICE_SECONDS)

    def send(self, kind: int, message: dict) -> None:
        self._send_all([records.pack(kind, message)])

    def send_all(self, items: list[tuple[int, dict]]) -> None:
        """Several message records in one write."""
        self._send_all([b"".join(records.pack(kind, message) for kind, message in items)])

    def send_with_fd(self, kind: int, message: dict, fd: int) -> None:
        """A record with ``fd`` attached: it arrives with the record's first byte."""
        data = records.pack(kind, message)
        try:
            sent = socket.send_fds(self.sock, [data], [fd])
        except OSError as err:
            raise MigrationError(f"cannot pass guest RAM to the {self.peer}: {err.strerror}") from None
        self.bytes_sent += sent
        self._send_all([data[sent:]])

    def send_pages(self, offset: int, address: int, length: int) -> None:
        """Guest RAM bytes [offset, offset + length) of the mapping at ``address``."""
        data = bytes(view(address + offset, length))  # what the checksum and the peer both see
        prefix = records.PAGE_OFFSET.pack(offset)
        checksum = records.crc32(data, records.crc32(prefix))
        self._send_all([records.header(records.PAGES, len(prefix) + length, checksum), prefix, data])

    # --- Receiving. ---

    def _receive_into(self, buffer: memoryview) -> None:
        """Fill ``buffer`` from the peer, slice by slice; MigrationError if it stops or goes."""
        idle_since = time.monotonic()
        while buffer:
            reason = self.stop()
            if reason is not None:
                raise MigrationError(reason)
            try:
                count, ancillary, _flags, _address = self.sock.recvmsg_into([buffer], _FD_SPACE)
            except TimeoutError:
                if time.monotonic() - idle_since > IDLE_TIMEOUT_SECONDS:
                    raise MigrationError(f"the {self.peer} sent nothing for {IDLE_TIMEOUT_SECONDS:g} s") from None
                continue
            except InterruptedError:
                continue
            except OSError as err:
                raise MigrationError(f"the {self.peer} went away ({err.strerror or err})") from None
            self._keep_fds(ancillary)
            if not count:
                raise MigrationError(f"the {self.peer} closed the connection")
            buffer = buffer[count:]
            idle_since = time.monotonic()

    def _keep_fds(self, ancillary) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self.received_fds += fds

    def receive_header(self) -> tuple[int, int, int]:
        """The next record's (kind, length, checksum); refuses a kind or size no record has."""
        header = bytearray(records.HEADER.size)
        self._receive_into(memoryview(header))
        try:
            return records.decode_header(bytes(header))
        except StateError as err:
            raise MigrationError(f"corrupt migration stream from the {self.peer}: {err}") from None

    def receive_message(self, kind: int, length: int, checksum: int) -> dict:
        payload = bytearray(length)
        self._receive_into(memoryview(payload))
        try:
            records.check(kind, payload, checksum)
            return records.unpack(kind, bytes(payload))
        except StateError as err:
            raise MigrationError(f"corrupt migration stream from the {self.peer}: {err}") from None

    def receive_pages(self, length: int, checksum: int, memory) -> int:
        """A PAGES record's data, straight into ``memory`` (GuestMemory); returns its length."""
        prefix = bytearray(records.PAGE_OFFSET.size)
        self._receive_into(memoryview(prefix))
        (offset,) = records.PAGE_OFFSET.unpack(prefix)
        size = length - len(prefix)
        if offset % 4096 or size % 4096 or offset + size > memory.size:
            raise MigrationError(f"corrupt migration stream from the {self.peer}: pages at {offset:#x} "
                                 f"+ {size:#x} are not whole pages of the guest's {memory.size:#x} bytes")
        target = view(memory.host_address + offset, size)
        self._receive_into(target)
        if records.crc32(target, records.crc32(prefix)) != checksum:
            raise MigrationError(f"corrupt migration stream from the {self.peer}: the pages at {offset:#x} "
                                 "fail their checksum")
        return size

    def expect(self, *kinds: int) -> tuple[int, dict]:
        """The next record, which must be a message of one of ``kinds`` (CANCEL is the peer's error)."""
        kind, length, checksum = self.receive_header()
        if kind == records.PAGES:
            raise MigrationError(f"the {self.peer} sent pages out of turn")
        message = self.receive_message(kind, length, checksum)
        if kind == records.CANCEL and records.CANCEL not in kinds:
            raise MigrationError(f"the {self.peer} gave up: {message.get('reason', 'no reason given')}")
        if kind not in kinds:
            raise MigrationError(f"the {self.peer} sent a {records.name(kind)} record where "
                                 f"{' or '.join(records.name(k) for k in kinds)} was due")
        return kind, message

    def close(self) -> None:
        for fd in self.received_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.received_fds = []
        self.sock.close()

    def take_fd(self) -> int | None:
        """The one file descriptor that came with the records so far (ours to close), if any."""
        if len(self.received_fds) != 1:
            return None
        return self.received_fds.pop()
