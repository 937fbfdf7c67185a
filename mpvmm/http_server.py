"""A small HTTP/1.1 server on one thread, bounded in everything a client controls.

It serves the metrics endpoint (metrics/exporter.py) and the control API
(api/server.py). Any local user can connect to the first, and a client of
either may send its request a byte at a time, stop half-way, send garbage,
never read its answer, or open connection after connection; none of it may
stall or crash the VMM. One thread multiplexes every connection with a
selector (non-blocking sockets, no blocking call a client can stretch) and
enforces:

- a deadline for the whole exchange, from accept to the last byte of the
  answer (``REQUEST_DEADLINE_SECONDS``), not a per-read timeout a client
  can renew with each byte;
- caps on the request head (``MAX_REQUEST_HEAD_BYTES``) and body
  (``MAX_REQUEST_BODY_BYTES``, given by Content-Length; chunked bodies are
  refused);
- a cap on simultaneous connections (``MAX_CONNECTIONS``): one over it
  closes the oldest connection still sending its request.

The handler runs on the server thread and must not block: it returns a
``Response``, or a ``concurrent.futures.Future`` of one for work another
thread does (a snapshot, a migration). Such a request is parked with no
deadline until the future is done (then its answer gets
``ANSWER_DEADLINE_SECONDS``); a client that hangs up meanwhile only loses
the answer. One request per connection (``Connection: close``). ``close``
wakes the thread through a pipe, and the thread closes every socket it
holds before it ends, so nothing is left and nothing waits on a client.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

REQUEST_DEADLINE_SECONDS = 5.0  # a scrape of a 64-vCPU VM is answered in about 50 ms
ANSWER_DEADLINE_SECONDS = 5.0  # for the answer to a parked request, once it is ready
MAX_CONNECTIONS = 16  # Prometheus scrapes one at a time; a few people may run `mpvmm top` or `ctl`
MAX_REQUEST_HEAD_BYTES = 8192  # Prometheus sends about 300
MAX_REQUEST_BODY_BYTES = 64 * 1024
RECV_SIZE = 4096
SEND_SIZE = 256 * 1024
HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Request:
    method: str
    target: str  # as sent: path and query
    headers: dict[str, str]  # names in lower case
    body: bytes = b""


@dataclass
class Response:
    status: int
    reason: str
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, with_body: bool = True) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {self.reason}", *(f"{name}: {value}" for name, value in self.headers),
                 f"Content-Length: {len(self.body)}", "Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")
        return head + self.body if with_body else head


Handler = Callable[[Request], "Response | Future[Response]"]


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


def plain(status: int, reason: str, text: str) -> Response:
    return Response(status, reason, text.encode() + b"\n", [("Content-Type", "text/plain; charset=utf-8")])


class _Connection:
    """One client: what it sent so far, what is left to send, and its deadline (None while parked)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline: float | None = deadline
        self.received = bytearray()
        self.request: Request | None = None  # once its head is parsed
        self.pending: Future | None = None  # a parked request's answer to come
        self.outgoing: memoryview | None = None  # set once the request is answered
        self.draining = False  # answered and shut down for writing: read until EOF, then close


class HttpServer:
    """Serves ``handler(request)`` on a listening socket, on a thread of its own."""

    _thread: threading.Thread | None = None

    def __init__(self, listener: socket.socket, handler: Handler, thread_name: str):
        self._listener = listener
        self._handler = handler
        listener.setblocking(False)
        # The bound port of a TCP listener (the metrics endpoint's port 0 becomes one); None on a Unix socket.
        self.port = listener.getsockname()[1] if listener.family != socket.AF_UNIX else None
        self._connections: dict[socket.socket, _Connection] = {}
        self._finished: list[_Connection] = []  # parked requests whose future is done
        self._finished_lock = threading.Lock()
        self._stopping = False
        self._flush_until = 0.0
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._thread.start()

    # --- The loop. ---

    def _serve(self) -> None:
        try:
            while not self._done_serving():
                for key, _events in self._selector.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_read:
                        self._drain_wake_pipe()
                    elif key.fileobj in self._connections:
                        self._on_ready(self._connections[key.fileobj])
                self._answer_finished()
                self._expire(time.monotonic())
        finally:
            for connection in list(self._connections.values()):
                self._drop(connection)
            self._selector.close()
            self._listener.close()
            os.close(self._wake_read)

    def _done_serving(self) -> bool:
        """Stopping, and no answer is left to send (or the time to send them is up)."""
        if not self._stopping:
            return False
        sending = any(c.outgoing is not None for c in self._connections.values()) or self._finished
        return not sending or time.monotonic() >= self._flush_until

    def _timeout(self) -> float | None:
        deadlines = [c.deadline for c in self._connections.values() if c.deadline is not None]
        if self._stopping:
            deadlines.append(self._flush_until)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _wake(self) -> None:
        """Make the loop look again; safe from any thread, and after close (it does nothing then)."""
        with self._finished_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"x")
                except (BlockingIOError, BrokenPipeError):
                    pass  # full of wake-ups already, or the loop has just ended by itself

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
            if self._stopping:
                sock.close()
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                receiving = [c for c in self._connections.values() if c.pending is None and c.deadline is not None]
                if not receiving:
                    sock.close()  # every slot waits on an operation: nobody to make room
                    continue
                self._drop(min(receiving, key=lambda c: c.deadline))
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + REQUEST_DEADLINE_SECONDS)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ)

    def _expire(self, now: float) -> None:
        for connection in [c for c in self._connections.values() if c.deadline is not None and c.deadline <= now]:
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
            self._drop(connection)  # gone before its request was complete or answered, or done draining
            return
        if connection.draining or connection.pending is not None:
            return  # bytes after the request: ignored
        connection.received += data
        if connection.request is None and not self._parse_head(connection):
            return
        self._dispatch_when_complete(connection)

    def _parse_head(self, connection: _Connection) -> bool:
        """True once the head is in and parsed; answers itself when it is bad."""
        end = HEAD_END.search(connection.received)
        if end is None:
            if len(connection.received) > MAX_REQUEST_HEAD_BYTES:
                self._answer(connection, plain(431, "Request Header Fields Too Large", "request head too large"))
            return False
        request = parse_head(bytes(connection.received[:end.start()]))
        if request is None:
            self._answer(connection, plain(400, "Bad Request", "not an HTTP/1.x request"))
            return False
        if "transfer-encoding" in request.headers:
            self._answer(connection, plain(411, "Length Required", "send the body with a Content-Length"))
            return False
        length = request.headers.get("content-length", "0")
        if not length.isdigit():
            self._answer(connection, plain(400, "Bad Request", "Content-Length is not a number"))
            return False
        if int(length) > MAX_REQUEST_BODY_BYTES:
            self._answer(connection, plain(413, "Content Too Large", f"bodies are at most {MAX_REQUEST_BODY_BYTES} bytes"))
            return False
        connection.request = request
        del connection.received[:end.end()]
        return True

    def _dispatch_when_complete(self, connection: _Connection) -> None:
        request = connection.request
        length = int(request.headers.get("content-length", "0"))
        if len(connection.received) < length:
            return
        request.body = bytes(connection.received[:length])
        connection.received = bytearray()
        try:
            response = self._handler(request)
        except Exception as err:  # the handler's bug must not end the server
            response = plain(500, "Internal Server Error", f"{type(err).__name__}: {err}")
        if isinstance(response, Future):
            connection.pending, connection.deadline = response, None
            response.add_done_callback(lambda _future: self._on_finished(connection))
            return
        self._answer(connection, response)

    def _on_finished(self, connection: _Connection) -> None:
        """A parked request's future is done (on whatever thread finished it)."""
        with self._finished_lock:
            self._finished.append(connection)
        self._wake()

    def _answer_finished(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, []
        for connection in finished:
            if self._connections.get(connection.sock) is not connection:
                continue  # the client hung up while it waited
            try:
                response = connection.pending.result()
            except Exception as err:
                response = plain(500, "Internal Server Error", f"{type(err).__name__}: {err}")
            try:
                self._answer(connection, response)
            except OSError:
                self._drop(connection)

    def _answer(self, connection: _Connection, response: Response) -> None:
        with_body = connection.request is None or connection.request.method != "HEAD"
        connection.outgoing = memoryview(response.encode(with_body))
        connection.received = bytearray()
        if connection.deadline is None:  # it was parked: its answer gets a deadline of its own
            connection.deadline = time.monotonic() + ANSWER_DEADLINE_SECONDS
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

    def close(self, flush_seconds: float = 1.0) -> None:
        """Stop serving; answers already made get up to ``flush_seconds`` to go out. Idempotent.

        Every socket the thread held is closed when this returns. A parked
        request whose operation never finished is lost with its connection.
        """
        if self._thread is None:
            return
        self._flush_until = time.monotonic() + flush_seconds
        self._stopping = True
        self._wake()
        self._thread.join()
        self._thread = None
        with self._finished_lock:
            os.close(self._wake_write)
            self._wake_write = -1
