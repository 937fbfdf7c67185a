"""Host limit checks: each refuses with a one-line HostLimitError that names the limit."""

import os

import pytest

from mpvmm.arguments import format_size
from mpvmm.errors import HostLimitError, UsageError
from mpvmm.supervisor import limits

MQUEUE = "/proc/sys/fs/mqueue"


def _sysctl(name):
    try:
        with open(f"{MQUEUE}/{name}") as f:
            return int(f.read())
    except OSError:
        pytest.skip(f"{MQUEUE}/{name} is not readable here")


def _mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no MemAvailable in /proc/meminfo")


def test_queue_depth_fits_msg_max():
    depth = limits.queue_depth()
    assert 1 <= depth <= 10
    assert depth <= _sysctl("msg_max")
    assert depth == min(10, _sysctl("msg_max"))


def test_too_many_vcpus_for_queues_max():
    queues_max = _sysctl("queues_max")
    cpus = queues_max // 2 + 1
    with pytest.raises(HostLimitError) as info:
        limits.check_queues(cpus)
    message = str(info.value)
    assert "fs.mqueue.queues_max" in message
    assert str(queues_max) in message
    assert str(2 * cpus) in message
    assert "\n" not in message


def test_queues_for_one_vcpu_fit():
    limits.check_queues(1)


def test_the_ring_transport_needs_no_message_queues():
    cpus = _sysctl("queues_max") // 2 + 1  # more queues than the host allows
    with pytest.raises(HostLimitError, match="queues_max"):
        limits.check_host(cpus, 64 << 20)
    limits.check_host(cpus, 64 << 20, message_queues=False)


def test_more_memory_than_available():
    size = _mem_available() + (1 << 30)
    with pytest.raises(HostLimitError) as info:
        limits.check_memory(size)
    message = str(info.value)
    assert "available memory" in message
    assert f"guest memory of {format_size(size)} exceeds" in message
    assert "--memory" in message
    assert "\n" not in message


def test_more_memory_than_dev_shm_holds(monkeypatch):
    # Isolate the /dev/shm check: pretend MemAvailable is unknown.
    monkeypatch.setattr(limits, "_mem_available", lambda: None)
    info = os.statvfs("/dev/shm")
    size = info.f_bavail * info.f_frsize + (1 << 30)
    with pytest.raises(HostLimitError) as raised:
        limits.check_memory(size)
    message = str(raised.value)
    assert "/dev/shm" in message
    assert "\n" not in message


def test_small_memory_fits():
    limits.check_memory(64 << 20)


def test_host_limit_error_is_a_usage_error():
    assert issubclass(HostLimitError, UsageError)
    assert HostLimitError.exit_code == 2
