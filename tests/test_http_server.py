"""The bounded HTTP server (the metrics endpoint's and the API's) over a real Unix socket.

Clients that trickle, hang up, flood or wait; tests/metrics/test_exporter_clients.py
has the same against the metrics endpoint over TCP.
"""

import socket
import threading
import time
from concurrent.futures import Future

import pytest

from mpvmm import http_server
from mpvmm.http_server import HttpServer, Response


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(http_server, "REQUEST_DEADLINE_SECONDS", 0.5)


class Served:
    """A server on a socket in ``tmp_path`` whose handler records requests; answers may wait on futures."""

    def __init__(self, path):
        self.path = str(path)
        self.requests = []
        self.futures = {}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self.server = HttpServer(listener, self.handle, "test-http")

    def handle(self, request):
        self.requests.append(request)
        if request.target == "/later":
            future = Future()
            self.futures[len(self.requests)] = future
            return future
        return Response(200, "OK", b"body:" + request.body)

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.path)
        return sock

    def exchange(self, data: bytes) -> bytes:
        with self.connect() as sock:
            sock.sendall(data)
            return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def served(tmp_path):
    served = Served(tmp_path / "api.sock")
    yield served
    served.server.close()


def test_a_request_with_a_body_is_answered(served):
    answer = served.exchange(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nbody:hello")
    assert served.requests[0].method == "PUT" and served.requests[0].body == b"hello"


def test_a_body_sent_in_pieces_is_put_together(served):
    with served.connect() as sock:
        sock.sendall(b"PUT /x HTTP/1.1\r\nContent-Length: 6\r\n\r\nab")
        time.sleep(0.05)
        sock.sendall(b"cdef")
        assert read_all(sock).endswith(b"body:abcdef")


@pytest.mark.parametrize("data, status", [
    (b"\x00\x01\x02garbage\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 9000, b"431"),
    (b"PUT / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", b"413"),
    (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
    (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
])
def test_bad_requests_get_their_status(served, data, status):
    assert served.exchange(data).startswith(b"HTTP/1.1 " + status)
    assert served.requests == []


def test_a_trickling_client_is_cut_off_at_the_deadline_and_stalls_nobody(served, short_deadline):
    slow = served.connect()
    slow.sendall(b"GET / HT")
    started = time.monotonic()
    assert served.exchange(b"GET /fast HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < 0.4
    for byte in b"TP/1.1\r\nX: 1":
        try:
            slow.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    assert read_all(slow) == b""  # dropped without an answer, before its request was whole
    slow.close()
    assert [r.target for r in served.requests] == ["/fast"]


def test_clients_that_hang_up_mid_request_leave_the_server_serving(served):
    for partial in (b"PUT /x HTTP/1.1\r\nContent-Le", b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc", b"G"):
        with served.connect() as sock:
            sock.sendall(partial)
    assert served.exchange(b"GET /after HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    assert [r.target for r in served.requests] == ["/after"]


def test_a_deferred_answer_comes_when_its_future_is_done(served):
    waiting = served.connect()
    waiting.sendall(b"PUT /later HTTP/1.1\r\n\r\n")
    time.sleep(0.1)
    # Parked with no deadline; others are served meanwhile.
    assert served.exchange(b"GET /now HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    threading.Timer(0.2, served.futures[1].set_result, [Response(202, "Accepted", b"done")]).start()
    assert read_all(waiting).startswith(b"HTTP/1.1 202 Accepted")
    waiting.close()


def test_a_client_that_hangs_up_while_parked_loses_only_its_answer(served):
    with served.connect() as sock:
        sock.sendall(b"PUT /later HTTP/1.1\r\n\r\n")
        time.sleep(0.1)
    time.sleep(0.1)
    served.futures[1].set_result(Response(200, "OK", b"nobody hears"))
    assert served.exchange(b"GET /next HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_idle_connections_cannot_lock_out_the_next_client(served):
    idle = []
    for _ in range(http_server.MAX_CONNECTIONS + 4):
        idle.append(served.connect())
        time.sleep(0.01)  # let the server accept: a Unix socket's backlog refuses (EAGAIN) when full
    try:
        time.sleep(0.1)
        assert served.exchange(b"GET /x HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle:
            sock.close()


def test_close_flushes_made_answers_and_closes_everything(tmp_path):
    served = Served(tmp_path / "api.sock")
    parked = served.connect()
    parked.sendall(b"PUT /later HTTP/1.1\r\n\r\n")
    time.sleep(0.1)
    served.futures[1].set_result(Response(200, "OK", b"last words"))
    served.server.close()
    assert read_all(parked).endswith(b"last words")
    parked.close()
    assert not any(t.name == "test-http" for t in threading.enumerate())
    with pytest.raises(OSError):
        served.connect()
