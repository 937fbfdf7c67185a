"""Runs of guest RAM that hold something: holes and zero pages skipped, runs cut to size, checksummed."""

import ctypes

import pytest

from mpvmm.snapshot.ram import MAX_RUN, data_runs, runs_checksum, view
from mpvmm.supervisor.guest_memory import GuestMemory

PAGE = 4096


@pytest.fixture
def memory():
    with GuestMemory(64 << 20) as memory:
        yield memory


def runs(memory):
    return list(data_runs(memory.fd, memory.host_address, memory.size))


def test_fresh_memory_has_no_runs(memory):
    assert runs(memory) == []


def test_written_pages_make_runs_and_zeroed_ones_do_not(memory):
    memory.write(0x5000, b"x")  # one page
    memory.write(0x7FFF, b"yz")  # the last byte of one page and the first of the next
    memory.write(0x20000, bytes(PAGE))  # written, but with zeros: no run
    memory.write(memory.size - 1, b"!")  # the very last page
    assert runs(memory) == [(0x5000, PAGE), (0x7000, 2 * PAGE), (memory.size - PAGE, PAGE)]


def test_long_runs_are_cut_at_max_run(memory):
    ctypes.memset(memory.host_address + 0x100000, 1, MAX_RUN * 2 + PAGE)
    assert runs(memory) == [(0x100000, MAX_RUN), (0x100000 + MAX_RUN, MAX_RUN), (0x100000 + 2 * MAX_RUN, PAGE)]


def test_checksum_covers_content_and_place(memory):
    memory.write(0x3000, b"abc")
    first = runs_checksum(runs(memory), memory.host_address)
    memory.write(0x3001, b"X")
    changed = runs_checksum(runs(memory), memory.host_address)
    memory.write(0x3001, b"b")
    assert runs_checksum(runs(memory), memory.host_address) == first != changed
    memory.write(0x3000, bytes(3))
    memory.write(0x4000, b"abc")  # the same bytes one page on
    assert runs_checksum(runs(memory), memory.host_address) != first


def test_view_reads_and_writes_in_place(memory):
    view(memory.host_address + 0x1000, 4)[:] = b"abcd"
    assert memory.read(0x1000, 4) == b"abcd"
