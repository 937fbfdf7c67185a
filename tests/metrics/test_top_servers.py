"""``mpvmm top`` against endpoints that never finish: endless, huge or trickling answers.

Each is one line on stderr and exit 1, in bounded time and memory. The
command runs under a 1 GiB address-space limit, so a client that reads an
endless answer into memory fails the test instead of the host.
"""

import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from mpvmm.metrics import top

MPVMM = [sys.executable, "-m", "mpvmm"]
ADDRESS_SPACE_LIMIT = 1 << 30
METRIC_LINE = b'mpvmm_vm_info{cpus="1",runner="native",workload="demo",version="0"} 1\n'


def stream_forever(sock: socket.socket) -> None:
    """A 200 answer with no length whose body never ends, sent as fast as the client reads."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
    block = METRIC_LINE * 1000
    while True:
        sock.sendall(block)


def trickle_body(sock: socket.socket) -> None:
    """A body that grows by a line every half second (under any per-read timeout) and never ends."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    while True:
        sock.sendall(METRIC_LINE)
        time.sleep(0.5)


def trickle_headers(sock: socket.socket) -> None:
    """Headers a byte every half second: the answer never even starts."""
    sock.sendall(b"HTTP/1.1 200 OK\r\n")
    while True:
        sock.sendall(b"X")
        time.sleep(0.5)


def huge_with_length(sock: socket.socket) -> None:
    """A Content-Length far over the cap, and the bytes to match as fast as they are read."""
    size = top.MAX_BODY_BYTES * 4
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % size)
    block = METRIC_LINE * 1000
    for _ in range(size // len(block) + 1):
        sock.sendall(block)


class HostileServer:
    """Serves ``answer(sock)`` to every connection, each on a thread, until closed."""

    def __init__(self, answer):
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/metrics"
        self._clients: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._clients.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            sock.recv(65536)  # the request
            self._answer(sock)
        except OSError:
            pass  # the client hung up: what we want

    def close(self) -> None:
        self._listener.close()
        for sock in self._clients:
            sock.close()


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


@pytest.mark.parametrize("answer", [stream_forever, trickle_body, trickle_headers, huge_with_length])
def test_endless_or_huge_answer_is_one_line_and_exit_1(answer):
    server = HostileServer(answer)
    try:
        started = time.monotonic()
        process = subprocess.run([*MPVMM, "top", "--once", "--url", server.url], capture_output=True, text=True,
                                 timeout=60, preexec_fn=limit_address_space)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert process.returncode == 1, process.stderr[-2000:]
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpvmm: error: {server.url}"), process.stderr[-2000:]
    # Python's start-up and the one scrape's deadline, with room for a loaded host.
    assert elapsed < top.SCRAPE_DEADLINE_SECONDS + 10


def test_scrape_stops_at_the_size_cap_and_the_deadline():
    for answer, message in ((stream_forever, "larger than"), (trickle_body, "within")):
        server = HostileServer(answer)
        try:
            started = time.monotonic()
            with pytest.raises(top.ScrapeError, match=message):
                top.scrape(server.url)
            assert time.monotonic() - started <= top.SCRAPE_DEADLINE_SECONDS + 1
        finally:
            server.close()
