"""Clients of a /metrics endpoint that misbehave, as a local user could: for the endpoint tests and the soak.

Each runs on a thread of its own until told to stop or until the server is
gone, and never blocks for more than ``POLL_SECONDS`` at a time, so that
stopping one is prompt whatever the server does.
"""

from __future__ import annotations

import random
import socket
import threading
import time

from mpvmm import http_server as server

SLOW_BYTE_SECONDS = 2.5  # one byte every 2-3 s: under any per-read timeout
POLL_SECONDS = 0.2


class SlowClient:
    """Sends a GET one byte every ``byte_seconds``, never finishing its request head, until stopped."""

    def __init__(self, port: int, byte_seconds: float = SLOW_BYTE_SECONDS):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(None)  # blocking: MSG_DONTWAIT below must not wait for a timeout
        self.byte_seconds = byte_seconds
        self.closed_by_server_after: float | None = None
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._trickle, name="slow-client", daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for byte in head:
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                break
            if self._stop.wait(self.byte_seconds):
                return
            if self._server_closed():
                break
        self.closed_by_server_after = time.monotonic() - self._started

    def _server_closed(self) -> bool:
        try:
            return self.sock.recv(1, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


class HostileClients:
    """A random mix of misbehaving clients on ``port`` until ``close``: the soak's /metrics load.

    ``kinds`` picks from: ``slow`` (a request head trickled byte by byte),
    ``idle`` (more connections than the server holds, saying nothing),
    ``garbage`` (random bytes, an oversized head, odd methods and paths),
    ``deaf`` (asks and never reads the answer), ``scraper`` (honest scrapes
    back to back, the one that must keep being served).
    """

    KINDS = ("slow", "idle", "garbage", "deaf", "scraper")

    def __init__(self, port: int, rng: random.Random, kinds: tuple[str, ...] | None = None):
        self.port = port
        self.kinds = kinds or tuple(rng.sample(self.KINDS, rng.randint(1, len(self.KINDS))))
        self.scrapes_answered = 0
        self._rng = random.Random(rng.random())
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=getattr(self, f"_{kind}"), name=f"hostile-{kind}", daemon=True)
                         for kind in self.kinds]
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop every client; the names of those still running after ``timeout`` (none, or a hang)."""
        self._stop.set()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    # --- The clients: each loops until stopped or the server is gone. ---

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=POLL_SECONDS)
        except OSError:
            self._stop.wait(POLL_SECONDS)  # refused or slow: the run may be ending
            return None
        sock.settimeout(POLL_SECONDS)
        return sock

    def _slow(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                continue
            with sock:
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                    if self._stop.wait(self._rng.uniform(0.05, 0.5)) or not _send(sock, bytes([byte])):
                        break

    def _idle(self) -> None:
        held: list[socket.socket] = []
        try:
            while not self._stop.is_set():
                if len(held) < 2 * server.MAX_CONNECTIONS and (sock := self._connect()) is not None:
                    held.append(sock)
                else:
                    self._stop.wait(POLL_SECONDS)
        finally:
            for sock in held:
                sock.close()

    def _garbage(self) -> None:
        requests = [
            lambda: self._rng.randbytes(self._rng.randint(1, 4096)),
            lambda: b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (server.MAX_REQUEST_HEAD_BYTES + 1) + b"\r\n\r\n",
            lambda: b"DELETE /metrics HTTP/1.1\r\n\r\n",
            lambda: b"GET /../../etc/passwd HTTP/1.1\r\n\r\n",
            lambda: b"GET /metrics HTTP/9.9\r\n\r\n\r\n\r\n",
            lambda: b"\r\n" * 5000,
        ]
        while not self._stop.is_set():
            sock = self._connect()
            if sock is not None:
                with sock:
                    _send(sock, self._rng.choice(requests)())
                    _drain(sock, self._stop)

    def _deaf(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is not None:
                with sock:
                    _send(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    self._stop.wait(self._rng.uniform(0.2, 2.0))

    def _scraper(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is not None:
                with sock:
                    if _send(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
                        if _drain(sock, self._stop).startswith(b"HTTP/1.1 200 "):
                            self.scrapes_answered += 1


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:  # cut off, reset, or timed out against a full buffer
        return False


def _drain(sock: socket.socket, stop: threading.Event) -> bytes:
    """What the server answers until it closes, we are stopped, or it falls silent for a while."""
    chunks, silent = [], 0
    while not stop.is_set() and silent < 10:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            silent += 1
            continue
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
