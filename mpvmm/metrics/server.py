"""A small HTTP/1.1 server on one thread, bounded in everything a client controls.

Any local user can connect to the metrics endpoint, so no client may hold
it: one that sends its request a byte at a time, never reads its answer, or
opens connection after connection. One thread multiplexes every connection
with a selector (non-blocking sockets, no blocking call a client can
stretch) and enforces:

- a deadline for the whole exchange, from accept to the last byte of the
  answer (``REQUEST_DEADLINE_SECONDS``), not a per-read timeout a client can
  renew with each byte;
- a cap on simultaneous connections (``MAX_CONNECTIONS``): a new one over
  the cap closes the oldest, so a client holding many idle connections
  cannot lock out the next scrape;
- a cap on the request head (``MAX_REQUEST_HEAD_BYTES``).

One request per connection (``Connection: close``). ``close`` wakes the
thread through a pipe, and the thread closes every socket it holds before it
ends, so nothing is left and nothing waits on a client.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

REQUEST_DEADLINE_SECONDS = 5.0  # a scrape of a 64-vCPU VM is answered in about 50 ms
MAX_CONNECTIONS = 16  # Prometheus scrapes one at a time; a few people may run `mpvmm top`
MAX_REQUEST_HEAD_BYTES = 8192  # Prometheus sends about 300
RECV_SIZE = 4096
SEND_SIZE = 256 * 1024
HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # names in lower case


@dataclass
class Response:
    status: int
    reason: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, with_body: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}", *(f"{name}: {value}" for name, value in self.headers),
                 f"Content-Length: {len(self.body)}", "Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        return head + self.body if with_body else head


def parse_head(head: bytes) -> Request | None:
    """The request line and headers, or None when they are not HTTP/1.x."""
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return None
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1], headers)


def _plain(status: int, reason: str, text: str) -> Response:
    return Response(status, reason, text.encode() + b"\n", [("Content-Type", "text/plain; charset=utf-8")])


class _Connection:
    """One client: what it sent so far, what is left to send, and its deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.outgoing: memoryview | None = None  # set once the request is answered
        self.draining = False  # answered and shut down for writing: read until EOF, then close


class HttpServer:
    """Serves ``handler(request) -> Response`` on a listening socket, on a thread of its own."""

    _thread: threading.Thread | None = None

    def __init__(self, listener: socket.socket, handler: Callable[[Request], Response], thread_name: str):
        self._listener = listener
        self._handler = handler
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._connections: dict[socket.socket, _Connection] = {}
        self._stopping = False
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._thread.start()

    # --- The loop. ---

    def _serve(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._connections:
                    timeout = max(0.0, min(c.deadline for c in self._connections.values()) - time.monotonic())
                for key, _events in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_read:
                        self._drain_wake_pipe()
                    elif key.fileobj in self._connections:
                        self._on_ready(self._connections[key.fileobj])
                self._expire(time.monotonic())
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)
            self._selector.close()
            self._listener.close()
            os.close(self._wake_read)

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 64):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        while True:
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED, EMFILE ...: the next one may work
            if len(self._connections) >= MAX_CONNECTIONS:
                self._drop(min(self._connections.values(), key=lambda c: c.deadline))
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + REQUEST_DEADLINE_SECONDS)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ)

    def _expire(self, now: float) -> None:
        for connection in [c for c in self._connections.values() if c.deadline <= now]:
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.pop(connection.sock, None)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass
        connection.sock.close()

    # --- One connection. ---

    def _on_ready(self, connection: _Connection) -> None:
        try:
            if connection.outgoing is not None:
                self._send(connection)
            else:
                self._receive(connection)
        except OSError:
            self._drop(connection)

    def _receive(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        if not data:
            self._drop(connection)  # gone before its request was complete, or done draining
            return
        if connection.draining:
            return
        connection.received += data
        end = HEAD_END.search(connection.received)
        if end is None:
            if len(connection.received) > MAX_REQUEST_HEAD_BYTES:
                self._answer(connection, _plain(431, "Request Header Fields Too Large", "request head too large"), True)
            return
        request = parse_head(bytes(connection.received[:end.start()]))
        if request is None:
            self._answer(connection, _plain(400, "Bad Request", "not an HTTP/1.x request"), True)
            return
        try:
            response = self._handler(request)
        except Exception as err:  # the handler's bug must not end the endpoint
            response = _plain(500, "Internal Server Error", f"{type(err).__name__}: {err}")
        self._answer(connection, response, request.method != "HEAD")

    def _answer(self, connection: _Connection, response: Response, with_body: bool) -> None:
        connection.outgoing = memoryview(response.encode(with_body))
        connection.received = bytearray()
        self._selector.modify(connection.sock, selectors.EVENT_WRITE)
        self._send(connection)

    def _send(self, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.outgoing[:SEND_SIZE])
        except BlockingIOError:
            return  # its receive window is full: the selector says when to go on
        connection.outgoing = connection.outgoing[sent:]
        if not connection.outgoing:
            # Read what the client still sends until it closes: closing with
            # unread input would reset the connection and could lose the answer.
            connection.sock.shutdown(socket.SHUT_WR)
            connection.draining = True
            connection.outgoing = None
            self._selector.modify(connection.sock, selectors.EVENT_READ)

    # --- Shutting down. ---

    def close(self) -> None:
        """Stop the thread; every socket it held is closed when this returns. Idempotent."""
        if self._thread is None:
            return
        self._stopping = True
        try:
            os.write(self._wake_write, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        except BrokenPipeError:
            pass  # woken by a client meanwhile, the thread saw the flag and has left, closing its end
        self._thread.join()
        self._thread = None
        os.close(self._wake_write)
