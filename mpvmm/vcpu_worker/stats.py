"""The per-vCPU stats and control area shared by a worker and the supervisor.

Mirrors ``struct vcpu_stats`` and ``struct route`` of _runloop.c (checked by
tests/vcpu_worker/test_layout.py). Both runners write the same area, so the
summary, the report and the metrics read one format whatever ran the vCPU.
"""

import ctypes

STATS_EXIT_REASONS = 64
LATENCY_BUCKETS = 21
# Upper bounds of the sync round-trip buckets: 1 us * 2**k, the last is +Inf.
LATENCY_BOUNDS_SECONDS = tuple(1e-6 * (1 << k) for k in range(LATENCY_BUCKETS - 1))
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

def latency_bucket(ns: int) -> int:
    """The bucket a round trip of ``ns`` nanoseconds falls in, as record_latency() buckets it."""
    bound = 1000
    for bucket in range(LATENCY_BUCKETS - 1):
        if ns <= bound:
            return bucket
        bound <<= 1
    return LATENCY_BUCKETS - 1
