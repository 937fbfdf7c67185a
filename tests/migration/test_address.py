"""Migration addresses: tcp:HOST:PORT and unix:PATH, and nothing else."""

import os
import socket
import stat

import pytest

from mpvmm.errors import UsageError
from mpvmm.migration.address import Listener, MigrationAddress, connect, parse


@pytest.mark.parametrize("text, expected", [
    ("tcp:127.0.0.1:4444", MigrationAddress("tcp", host="127.0.0.1", port=4444)),
    ("tcp:[::1]:1", MigrationAddress("tcp", host="::1", port=1)),
    ("tcp:localhost:65535", MigrationAddress("tcp", host="localhost", port=65535)),
    ("unix:/run/x.sock", MigrationAddress("unix", path="/run/x.sock")),
])
def test_good_addresses(text, expected):
    address = parse(text)
    assert address == expected
    assert str(address) == text
    assert address.passes_memory == (expected.scheme == "unix")


@pytest.mark.parametrize("text", ["", "tcp:", "tcp:host", "tcp::80", "tcp:host:0", "tcp:host:65536",
                                  "tcp:host:http", "unix:", "udp:host:1", "/path/alone"])
def test_bad_addresses_are_usage_errors(text):
    with pytest.raises(UsageError, match="tcp:HOST:PORT or unix:PATH"):
        parse(text)


def test_a_unix_listener_is_private_and_leaves_no_path(tmp_path):
    path = tmp_path / "in.sock"
    listener = Listener(parse(f"unix:{path}"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    connect(parse(f"unix:{path}"), 1.0).close()
    listener.close()
    assert not path.exists()


def test_a_busy_tcp_address_is_a_usage_error():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"--incoming tcp:127.0.0.1:{port}: cannot listen"):
            Listener(parse(f"tcp:127.0.0.1:{port}"))
