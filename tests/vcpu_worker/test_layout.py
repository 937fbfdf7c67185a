"""The Python mirrors of the run loop's layouts and enums (stats_page.py, route_table.py, outcome.py) against the C.

``_runloop.layout()`` reports offsetof/sizeof from the compiled extension, so
any drift between _runloop.c and stats_page.py fails here, like kvm-bindings'
generated layout tests.
"""

import ctypes
import mmap
import re
import struct
from pathlib import Path

import pytest

from mpvmm.devicemodel.protocol import MAX_MESSAGE_SIZE
from mpvmm.supervisor import limits
from mpvmm.vcpu_worker import _runloop, route_table, stats_page
from mpvmm.vcpu_worker.outcome import LoopCode
from mpvmm.vcpu_worker.stats_page import LoopRequest, WorkerState
from mpvmm.vcpu_worker.route_table import Route, RouteTable

RUNLOOP_SOURCE = Path(_runloop.__file__).with_name("_runloop.c")
OUTCOME_HEADER = Path(_runloop.__file__).with_name("outcome.h")


def c_source() -> str:
    """The run loop and the outcome header it includes."""
    return RUNLOOP_SOURCE.read_text() + OUTCOME_HEADER.read_text()


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
    assert ctypes.sizeof(stats_page.VcpuStats) == layout["vcpu_stats.sizeof"]
    assert layout["vcpu_stats.sizeof"] <= stats_page.STATS_AREA_STRIDE


def test_vcpu_stats_every_field_offset(layout):
    c_fields = {key.split(".", 1)[1] for key in layout if key.startswith("vcpu_stats.")} - {"sizeof"}
    py_fields = [name for name, _ in stats_page.VcpuStats._fields_]
    assert set(py_fields) == c_fields
    for name in py_fields:
        assert getattr(stats_page.VcpuStats, name).offset == layout[f"vcpu_stats.{name}"], name


def test_vcpu_stats_array_lengths(layout):
    def length(field, following):
        return (layout[f"vcpu_stats.{following}"] - layout[f"vcpu_stats.{field}"]) // 8

    assert length("exits", "paths") == stats_page.STATS_EXIT_REASONS
    assert length("paths", "sync_latency_buckets") == len(stats_page.PATHS)
    assert length("sync_latency_buckets", "sync_latency_sum_ns") == stats_page.LATENCY_BUCKETS


def test_stats_stride_is_a_page():
    assert stats_page.STATS_AREA_STRIDE == mmap.PAGESIZE


# --- struct route ---


def test_route_size(layout):
    packed = RouteTable([Route(route_table.SPACE_PIO, 0x510, 4, route_table.ACTION_NULL)]).pack()
    assert len(packed) == layout["route.sizeof"] == 24


def test_route_fields_land_at_the_c_offsets(layout):
    space, base, length, action = route_table.SPACE_MMIO, 0x1122334455667788, 0x000000AABBCCDD00, route_table.ACTION_SLEEP
    packed = RouteTable(
        [Route(space, base, length, action), Route(route_table.SPACE_PIO, 0x510, 4, route_table.ACTION_NULL)]
    ).pack()
    size = layout["route.sizeof"]
    assert len(packed) == 2 * size
    assert struct.unpack_from("<Q", packed, layout["route.base"]) == (base,)
    assert struct.unpack_from("<Q", packed, layout["route.length"]) == (length,)
    assert struct.unpack_from("<I", packed, layout["route.space"]) == (space,)
    assert struct.unpack_from("<I", packed, layout["route.action"]) == (action,)
    assert struct.unpack_from("<Q", packed, size + layout["route.base"]) == (0x510,)
    assert struct.unpack_from("<Q", packed, size + layout["route.length"]) == (4,)
    assert struct.unpack_from("<I", packed, size + layout["route.space"]) == (route_table.SPACE_PIO,)
    assert struct.unpack_from("<I", packed, size + layout["route.action"]) == (route_table.ACTION_NULL,)


def test_empty_route_table_packs_to_nothing():
    assert RouteTable([]).pack() == b""


# --- Constants and enums ---


def test_message_size_matches(layout):
    assert layout["MESSAGE_SIZE"] == MAX_MESSAGE_SIZE == limits.QUEUE_MESSAGE_SIZE


@pytest.mark.parametrize("enum, python_enum, prefix", [
    ("request", LoopRequest, "REQUEST_"),
    ("worker_state", WorkerState, "STATE_"),
    ("outcome", LoopCode, "OUTCOME_"),
])
def test_enums_match_the_c_source(enum, python_enum, prefix):
    members = _c_enums(c_source())[enum]
    assert {name.removeprefix(prefix): value for name, value in members} == \
        {member.name: member.value for member in python_enum}


@pytest.mark.parametrize("enum", ["route_action", "route_space"])
def test_route_constants_match_the_c_source(enum):
    members = _c_enums(c_source())[enum]
    assert members, enum
    for member, value in members:
        assert getattr(route_table, member) == value, member


def test_path_names_follow_the_c_enum_order():
    members = dict(_c_enums(c_source())["exit_path"])
    count = members.pop("PATH_COUNT")
    assert count == len(stats_page.PATHS)
    assert {value: name.removeprefix("PATH_").lower() for name, value in members.items()} == dict(
        enumerate(stats_page.PATHS)
    )


def test_latency_bounds_are_powers_of_two_microseconds(layout):
    bounds = layout["latency_bounds_ns"]
    assert len(bounds) == stats_page.LATENCY_BUCKETS - 1
    assert bounds == tuple(1000 << k for k in range(len(bounds)))
    assert stats_page.LATENCY_BOUNDS_SECONDS == tuple(ns / 1e9 for ns in bounds)


# --- latency_bucket(): the C function record_latency() uses ---


@pytest.mark.parametrize(
    "ns, bucket",
    [(0, 0), (999, 0), (1000, 0), (1001, 1), (1999, 1), (2000, 1), (4000, 2), (4001, 3), (1_000_000, 10),
     (1000 << 19, 19), ((1000 << 19) + 1, 20), (10**12, 20), (2**64 - 1, 20)],
)  # fmt: skip
def test_latency_bucket_examples(ns, bucket):
    assert _runloop.latency_bucket(ns) == bucket


def test_each_bound_closes_its_bucket(layout):
    """A round trip of exactly a bucket's bound is counted in it; one nanosecond more in the next."""
    for k, bound in enumerate(layout["latency_bounds_ns"]):
        assert _runloop.latency_bucket(bound) == k
        assert _runloop.latency_bucket(bound + 1) == k + 1
        assert _runloop.latency_bucket(bound - 1) == k


def test_python_loop_buckets_with_the_c_function():
    assert stats_page.latency_bucket is _runloop.latency_bucket
