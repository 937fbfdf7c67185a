"""The per-vCPU stats and control page shared by a vCPU's runner and the supervisor.

Mirrors ``struct vcpu_stats`` of _runloop.c (checked by
tests/vcpu_worker/test_layout.py); its array sizes and the sync latency
buckets come from the compiled loop itself, so they are written down once.
Every runner writes the same page, so the summary, the report and the
metrics read one format whatever ran the vCPU.
"""

import ctypes
import enum

from mpvmm.supervisor.guest_memory import map_shared, unmap
from mpvmm.vcpu_worker import _runloop

_C_LAYOUT = _runloop.layout()
STATS_EXIT_REASONS = _C_LAYOUT["STATS_EXIT_REASONS"]
LATENCY_BUCKETS = _C_LAYOUT["LATENCY_BUCKETS"]
# Upper bounds of the sync round-trip buckets; the last bucket is +Inf.
LATENCY_BOUNDS_SECONDS = tuple(ns / 1e9 for ns in _C_LAYOUT["latency_bounds_ns"])
# The bucket a round trip of ``ns`` nanoseconds is counted in (the Python loop's too).
latency_bucket = _runloop.latency_bucket
STATS_AREA_STRIDE = 4096  # one page per vCPU, so no two workers share a cache line

PATHS = ("native", "posted", "sync", "fallback")  # enum exit_path


class LoopRequest(enum.IntEnum):
    """``enum request``: what the supervisor asks of the loop (the page's ``request`` word)."""

    RUN = 0
    PAUSE = 1
    STOP = 2


class WorkerState(enum.IntEnum):
    """``enum worker_state``: where the loop is (the page's ``state`` word)."""

    IDLE = 0
    RUNNING = 1
    PAUSED = 2
    DONE = 3


class VcpuStats(ctypes.Structure):
    _fields_ = [
        ("request", ctypes.c_uint32),
        ("state", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("outcome", ctypes.c_uint32),
        ("outcome_value", ctypes.c_uint64),
        ("runs", ctypes.c_uint64),
        ("interrupted", ctypes.c_uint64),
        ("exits", ctypes.c_uint64 * STATS_EXIT_REASONS),
        ("paths", ctypes.c_uint64 * len(PATHS)),
        ("sync_latency_buckets", ctypes.c_uint64 * LATENCY_BUCKETS),
        ("sync_latency_sum_ns", ctypes.c_uint64),
        ("sleep_ns", ctypes.c_uint64),
        ("posted_stalls", ctypes.c_uint64),
        ("stale_replies", ctypes.c_uint64),
        ("server_wakeups", ctypes.c_uint64),
        ("reply_sleeps", ctypes.c_uint64),
    ]


assert ctypes.sizeof(VcpuStats) <= STATS_AREA_STRIDE


class StatsArea:
    """One stats page per vCPU, zeroed, in shared memory a forked worker process inherits."""

    base = 0  # class-level default, so close() works after a failed __init__

    def __init__(self, cpus: int):
        self.size = cpus * STATS_AREA_STRIDE
        self.base = map_shared(-1, self.size)

    def address(self, index: int) -> int:
        return self.base + index * STATS_AREA_STRIDE

    def close(self) -> None:
        if self.base:
            unmap(self.base, self.size)
            self.base = 0

    def __enter__(self) -> "StatsArea":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
