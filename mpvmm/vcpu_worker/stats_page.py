"""The per-vCPU stats and control page shared by a vCPU's runner and the supervisor.

Mirrors ``struct vcpu_stats`` of _runloop.c (checked by
tests/vcpu_worker/test_layout.py); its array sizes and the sync latency
buckets come from the compiled loop itself, so they are written down once.
Every runner writes the same page, so the summary, the report and the
metrics read one format whatever ran the vCPU.
"""

import ctypes

from mpvmm.vcpu_worker import _runloop

_C_LAYOUT = _runloop.layout()
STATS_EXIT_REASONS = _C_LAYOUT["STATS_EXIT_REASONS"]
LATENCY_BUCKETS = _C_LAYOUT["LATENCY_BUCKETS"]
# Upper bounds of the sync round-trip buckets; the last bucket is +Inf.
LATENCY_BOUNDS_SECONDS = tuple(ns / 1e9 for ns in _C_LAYOUT["latency_bounds_ns"])
# The bucket a round trip of ``ns`` nanoseconds is counted in (the Python loop's too).
latency_bucket = _runloop.latency_bucket
STATS_AREA_STRIDE = 4096  # one page per vCPU, so no two workers share a cache line

PATHS = ("native", "posted", "sync")

# enum request / worker_state / outcome.
REQUEST_RUN, REQUEST_PAUSE, REQUEST_STOP = 0, 1, 2
STATE_IDLE, STATE_RUNNING, STATE_PAUSED, STATE_DONE = 0, 1, 2, 3
OUTCOME_NONE, OUTCOME_STOPPED, OUTCOME_EXITED, OUTCOME_FAULT, OUTCOME_ERROR = 0, 1, 2, 3, 4


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
    ]


assert ctypes.sizeof(VcpuStats) <= STATS_AREA_STRIDE
