"""The Python mirrors of the run loop's layouts (stats.py, routes.py), checked against the C.

``_runloop.layout()`` reports offsetof/sizeof from the compiled extension, so
any drift between _runloop.c and stats.py fails here, like kvm-bindings'
generated layout tests.
"""

import ctypes
import re
import struct
from pathlib import Path

import pytest

from mpvmm.devicemodel.protocol import MAX_MESSAGE_SIZE
from mpvmm.supervisor import limits
from mpvmm.vcpu_worker import _runloop, routes, stats
from mpvmm.vcpu_worker.routes import Route, RouteTable

RUNLOOP_SOURCE = Path(_runloop.__file__).with_name("_runloop.c")


@pytest.fixture(scope="module")
def layout():
    return _runloop.layout()


def _c_enums(text):
    """{enum name: [(member, value), ...]} of every ``enum x { ... };`` in C source."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    enums = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\}\s*;", text, flags=re.S):
        members, value = [], -1
        for item in filter(None, (part.strip() for part in body.split(","))):
            member, _, explicit = (s.strip() for s in item.partition("="))
            value = int(explicit, 0) if explicit else value + 1
            members.append((member, value))
        enums[name] = members
    return enums


# --- struct vcpu_stats ---


def test_vcpu_stats_sizeof(layout):
    assert ctypes.sizeof(stats.VcpuStats) == layout["vcpu_stats.sizeof"]
    assert layout["vcpu_stats.sizeof"] <= stats.STATS_AREA_STRIDE


def test_vcpu_stats_every_field_offset(layout):
    c_fields = {key.split(".", 1)[1] for key in layout if key.startswith("vcpu_stats.")} - {"sizeof"}
    py_fields = [name for name, _ in stats.VcpuStats._fields_]
    assert set(py_fields) == c_fields
    for name in py_fields:
        assert getattr(stats.VcpuStats, name).offset == layout[f"vcpu_stats.{name}"], name


def test_vcpu_stats_array_lengths(layout):
    def length(field, following):
        return (layout[f"vcpu_stats.{following}"] - layout[f"vcpu_stats.{field}"]) // 8

    assert length("exits", "paths") == stats.STATS_EXIT_REASONS
    assert length("paths", "sync_latency_buckets") == len(stats.PATHS)
    assert length("sync_latency_buckets", "sync_latency_sum_ns") == stats.LATENCY_BUCKETS


def test_stats_stride_is_a_page():
    assert stats.STATS_AREA_STRIDE == 4096


# --- struct route ---


def test_route_size(layout):
    packed = RouteTable([Route(routes.SPACE_PIO, 0x510, 4, routes.ACTION_NULL)]).pack()
    assert len(packed) == layout["route.sizeof"] == 24


def test_route_fields_land_at_the_c_offsets(layout):
    space, base, length, action = routes.SPACE_MMIO, 0x1122334455667788, 0x000000AABBCCDD00, routes.ACTION_SLEEP
    packed = RouteTable(
        [Route(space, base, length, action), Route(routes.SPACE_PIO, 0x510, 4, routes.ACTION_NULL)]
    ).pack()
    size = layout["route.sizeof"]
    assert len(packed) == 2 * size
    assert struct.unpack_from("<Q", packed, layout["route.base"]) == (base,)
    assert struct.unpack_from("<Q", packed, layout["route.length"]) == (length,)
    assert struct.unpack_from("<I", packed, layout["route.space"]) == (space,)
    assert struct.unpack_from("<I", packed, layout["route.action"]) == (action,)
    assert struct.unpack_from("<Q", packed, size + layout["route.base"]) == (0x510,)
    assert struct.unpack_from("<Q", packed, size + layout["route.length"]) == (4,)
    assert struct.unpack_from("<I", packed, size + layout["route.space"]) == (routes.SPACE_PIO,)
    assert struct.unpack_from("<I", packed, size + layout["route.action"]) == (routes.ACTION_NULL,)


def test_empty_route_table_packs_to_nothing():
    assert RouteTable([]).pack() == b""


# --- Constants and enums ---


def test_constants_match(layout):
    assert stats.STATS_EXIT_REASONS == layout["STATS_EXIT_REASONS"]
    assert stats.LATENCY_BUCKETS == layout["LATENCY_BUCKETS"]
    assert layout["MESSAGE_SIZE"] == MAX_MESSAGE_SIZE == limits.QUEUE_MESSAGE_SIZE
    assert len(stats.LATENCY_BOUNDS_SECONDS) == stats.LATENCY_BUCKETS - 1


@pytest.mark.parametrize(
    "enum, module",
    [("request", stats), ("worker_state", stats), ("outcome", stats), ("route_action", routes), ("route_space", routes)],
)
def test_enum_values_match_the_c_source(enum, module):
    members = _c_enums(RUNLOOP_SOURCE.read_text())[enum]
    assert members, enum
    for member, value in members:
        assert getattr(module, member) == value, member


def test_path_names_follow_the_c_enum_order():
    members = dict(_c_enums(RUNLOOP_SOURCE.read_text())["exit_path"])
    count = members.pop("PATH_COUNT")
    assert count == len(stats.PATHS)
    assert {value: name.removeprefix("PATH_").lower() for name, value in members.items()} == dict(
        enumerate(stats.PATHS)
    )


def test_latency_bounds_are_powers_of_two_microseconds():
    assert stats.LATENCY_BOUNDS_SECONDS[0] == pytest.approx(1e-6)
    for lower, upper in zip(stats.LATENCY_BOUNDS_SECONDS, stats.LATENCY_BOUNDS_SECONDS[1:]):
        assert upper == pytest.approx(2 * lower)


# --- latency_bucket against record_latency() in _runloop.c ---


def _c_bucket(ns):
    """record_latency(): the first k < LATENCY_BUCKETS - 1 with ns <= 1000 << k, else the last."""
    bucket, bound = 0, 1000
    while bucket < stats.LATENCY_BUCKETS - 1 and ns > bound:
        bucket += 1
        bound <<= 1
    return bucket


def test_the_reference_rule_is_the_c_rule():
    source = RUNLOOP_SOURCE.read_text()
    body = re.search(r"static void record_latency\(.*?\n\}", source, flags=re.S).group(0)
    assert "uint64_t bound = 1000;" in body
    assert "while (bucket < LATENCY_BUCKETS - 1 && ns > bound)" in body
    assert "bound <<= 1;" in body


@pytest.mark.parametrize(
    "ns, bucket",
    [(0, 0), (999, 0), (1000, 0), (1999, 1), (2000, 1), (4000, 2), (4001, 3), (1_000_000, 10),
     (1000 << 19, 19), ((1000 << 19) + 1000, 20), (10**12, 20)],
)  # fmt: skip
def test_latency_bucket_examples(ns, bucket):
    assert _c_bucket(ns) == bucket
    assert stats.latency_bucket(ns) == bucket


def test_latency_bucket_matches_c_at_bounds_in_whole_microseconds():
    for k in range(stats.LATENCY_BUCKETS):
        for ns in ((1000 << k) - 1000, 1000 << k, (1000 << k) + 1000):
            assert stats.latency_bucket(ns) == _c_bucket(ns), ns


def test_latency_bucket_matches_c_one_nanosecond_around_every_bound():
    mismatches = [
        ns
        for k in range(stats.LATENCY_BUCKETS)
        for ns in ((1000 << k) - 1, 1000 << k, (1000 << k) + 1)
        if stats.latency_bucket(ns) != _c_bucket(ns)
    ]
    assert mismatches == []
