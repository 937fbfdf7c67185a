"""Where a VM migrates to: ``tcp:HOST:PORT`` or ``unix:PATH`` (a VMM on the same host).

Over TCP guest RAM is copied; over a Unix socket its shared memory object's
file descriptor is passed (SCM_RIGHTS) and the destination maps the same
pages, so nothing is copied at all.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from mpvmm.api.unix_socket import PrivateUnixSocket
from mpvmm.errors import UsageError


@dataclass(frozen=True)
class MigrationAddress:
    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def passes_memory(self) -> bool:
        """Guest RAM goes as a file descriptor (same host), not as pages."""
        return self.scheme == "unix"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse(text: str) -> MigrationAddress:
    """``tcp:HOST:PORT`` (an IPv6 host in brackets) or ``unix:PATH``; UsageError otherwise."""
    scheme, colon, rest = text.partition(":")
    if scheme == "unix" and colon and rest:
        return MigrationAddress("unix", path=rest)
    if scheme == "tcp" and colon:
        host, colon, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if colon and host and port.isdigit() and 0 < int(port) <= 65535:
            return MigrationAddress("tcp", host=host, port=int(port))
    raise UsageError(f"bad migration address {text!r}: use tcp:HOST:PORT or unix:PATH")


class Listener:
    """Where ``--incoming`` waits for one VM; bound at once, so a busy address is exit 2."""

    def __init__(self, address: MigrationAddress):
        self.address = address
        self._unix: PrivateUnixSocket | None = None
        if address.scheme == "unix":
            self._unix = PrivateUnixSocket(address.path, "--incoming")
            self.sock = self._unix.sock
            return
        try:
            family = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0][0]
            self.sock = socket.create_server((address.host, address.port), family=family, backlog=1)
        except OSError as err:
            raise UsageError(f"--incoming {address}: cannot listen: {err.strerror or err}") from err

    def close(self) -> None:
        if self._unix is not None:
            self._unix.close()
        else:
            self.sock.close()


def connect(address: MigrationAddress, timeout: float) -> socket.socket:
    """A connection to a waiting destination; OSError when there is none."""
    if address.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
