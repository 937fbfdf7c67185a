"""The Python mirror of the built-in guest's ABI (abi.py) against abi.h and the built ELF.

Offsets and sizes come from ``_runloop.layout()``, which the extension
computes with offsetof/sizeof from the same abi.h the guest is built with.
"""

import ctypes
import io
import re
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from mpvmm.guest import abi
from mpvmm.vcpu_worker import _runloop, stats_page
from mpvmm.x86 import layout

ABI_HEADER = Path(abi.__file__).with_name("abi.h")


@pytest.fixture(scope="module")
def c_layout():
    return _runloop.layout()


@pytest.fixture(scope="module")
def header():
    return ABI_HEADER.read_text()


def _enum_body(header, name):
    match = re.search(rf"enum\s+{name}\s*\{{(.*?)\}}\s*;", header, flags=re.S)
    assert match, f"enum {name} not found in abi.h"
    return match.group(1)


def _enum_members(header, name, prefix):
    """Member names of enum ``name`` in order, and their values."""
    body = re.sub(r"/\*.*?\*/", "", _enum_body(header, name), flags=re.S)
    members, value = [], -1
    for item in filter(None, (part.strip() for part in body.split(","))):
        member, _, explicit = (s.strip() for s in item.partition("="))
        assert member.startswith(prefix), member
        value = int(explicit, 0) if explicit else value + 1
        members.append((member.removeprefix(prefix), value))
    return members


def _define(header, name):
    match = re.search(rf"^#define\s+{name}\s+(0x[0-9a-fA-F]+|\d+)(?:ULL|UL|U)?\b", header, flags=re.M)
    assert match, f"#define {name} not found in abi.h"
    return int(match.group(1), 0)


def _check_struct(c_layout, c_name, py_struct, skip=()):
    c_fields = {key.split(".", 1)[1] for key in c_layout if key.startswith(f"{c_name}.")} - {"sizeof"}
    py_fields = [name for name, _ in py_struct._fields_ if name not in skip]
    assert set(py_fields) == c_fields
    for name in py_fields:
        assert getattr(py_struct, name).offset == c_layout[f"{c_name}.{name}"], name
    assert ctypes.sizeof(py_struct) == c_layout[f"{c_name}.sizeof"]


# --- Structures ---


def test_guest_params_layout(c_layout):
    # `reserved` and `reserved2` are padding the extension does not export; sizeof covers them.
    _check_struct(c_layout, "mpvmm_guest_params", abi.GuestParams, skip=("reserved", "reserved2"))
    assert abi.GuestParams.reserved.offset == c_layout["mpvmm_guest_params.pio_doorbell_port"] + 2
    assert abi.GuestParams.reserved2.offset == c_layout["mpvmm_guest_params.doorbell_value"] + 4


def test_guest_report_layout(c_layout):
    _check_struct(c_layout, "mpvmm_guest_report", abi.GuestReport)
    ops_bytes = c_layout["mpvmm_guest_report.sizeof"] - c_layout["mpvmm_guest_report.ops"]
    assert ops_bytes == 8 * c_layout["MPVMM_OP_COUNT"]


def test_guest_shared_size(c_layout):
    assert ctypes.sizeof(abi.GuestShared) == c_layout["mpvmm_guest_shared.sizeof"]
    assert abi.GuestShared.uart_lock.offset == 8 * abi.ATOMIC_COUNTERS


def test_op_count(c_layout):
    assert len(abi.OPS) == c_layout["MPVMM_OP_COUNT"]
    assert len(abi.GuestReport().ops) == len(abi.OPS)


def test_abi_version(c_layout, header):
    assert abi.ABI_VERSION == c_layout["MPVMM_GUEST_ABI_VERSION"] == _define(header, "MPVMM_GUEST_ABI_VERSION")


# --- Enums and constants parsed from abi.h ---


def test_workloads_follow_the_header_enum(header):
    members = _enum_members(header, "mpvmm_workload", "MPVMM_WORKLOAD_")
    assert [value for _, value in members] == list(range(len(members)))
    assert tuple(name.lower().replace("_", "-") for name, _ in members) == abi.WORKLOADS


def test_ops_follow_the_header_enum(header):
    members = _enum_members(header, "mpvmm_guest_op", "MPVMM_OP_")
    assert members[-1][0] == "COUNT"
    ops = members[:-1]
    assert [value for _, value in ops] == list(range(len(ops)))
    assert members[-1][1] == len(ops)
    assert tuple(name.lower() for name, _ in ops) == abi.OPS


@pytest.mark.parametrize(
    "name, value",
    [
        ("MPVMM_PARAMS_MAGIC", abi.PARAMS_MAGIC),
        ("MPVMM_REPORT_MAGIC", abi.REPORT_MAGIC),
        ("MPVMM_ATOMIC_COUNTERS", abi.ATOMIC_COUNTERS),
        ("MPVMM_REPORT_STATE_ONLINE", abi.REPORT_STATE_ONLINE),
        ("MPVMM_REPORT_STATE_DONE", abi.REPORT_STATE_DONE),
        ("MPVMM_STATUS_OK", abi.STATUS_OK),
        ("MPVMM_STATUS_READ_MISMATCH", abi.STATUS_READ_MISMATCH),
    ],
)
def test_constants_match_the_header(header, name, value):
    assert _define(header, name) == value


def test_magics_spell_their_names():
    assert abi.PARAMS_MAGIC.to_bytes(8, "little") == b"MPVMVPAR"
    assert abi.REPORT_MAGIC.to_bytes(8, "little") == b"MPVMREPT"


def _op_comments(header):
    """{op name: path or None} from the comment after each enum member."""
    paths = {}
    for member, comment in re.findall(r"MPVMM_OP_(\w+)(?:\s*=\s*\d+)?,\s*/\*\s*([^*]*?)\*/", _enum_body(header, "mpvmm_guest_op")):
        kind = comment.split(":", 1)[0].strip()
        # "no exit" ops cause none; "varies" ops have no fixed path (hostile pokes).
        paths[member.lower()] = None if kind in ("no exit", "varies") else kind
    return paths


def test_every_exit_causing_op_has_the_path_the_header_names(header):
    comments = _op_comments(header)
    assert set(comments) == set(abi.OPS)  # every op is commented
    expected = {op: path for op, path in comments.items() if path is not None}
    assert expected, "the header names some exit-causing ops"
    assert abi.OP_PATHS == expected
    assert set(abi.OP_PATHS.values()) <= set(stats_page.PATHS)


def test_mmio_ops_are_exit_causing_ops():
    assert set(abi.MMIO_OPS) <= set(abi.OP_PATHS)
    assert all(op.startswith("mmio_") for op in abi.MMIO_OPS)


def test_op_counts_maps_names_to_counters():
    report = abi.GuestReport()
    report.ops[abi.OPS.index("uart_bytes")] = 42
    counts = report.op_counts()
    assert list(counts) == list(abi.OPS)
    assert counts["uart_bytes"] == 42
    assert sum(counts.values()) == 42


# --- The guest's place in the layout ---


def test_report_stride_holds_a_report():
    assert layout.GUEST_REPORT_STRIDE >= ctypes.sizeof(abi.GuestReport)
    assert layout.GUEST_REPORT_STRIDE % 8 == 0


def test_params_fit_below_the_reports():
    assert layout.GUEST_PARAMS_ADDR + ctypes.sizeof(abi.GuestParams) <= layout.GUEST_REPORTS_ADDR


@pytest.fixture(scope="module")
def guest_elf():
    return ELFFile(io.BytesIO(abi.builtin_guest_path().read_bytes()))


def test_guest_elf_is_linked_at_the_code_address(guest_elf):
    assert guest_elf.elfclass == 64
    assert guest_elf["e_machine"] == "EM_X86_64"
    assert guest_elf["e_entry"] == layout.GUEST_CODE_ADDR
    symbols = guest_elf.get_section_by_name(".symtab")
    if symbols is not None:
        (start,) = symbols.get_symbol_by_name("_start")
        assert start["st_value"] == layout.GUEST_CODE_ADDR


def test_guest_elf_fits_its_slot(guest_elf):
    loads = [s for s in guest_elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert loads
    for segment in loads:
        assert segment["p_paddr"] >= layout.GUEST_CODE_ADDR
        assert segment["p_paddr"] + segment["p_memsz"] <= layout.GUEST_CODE_ADDR + layout.GUEST_CODE_MAX
    assert layout.GUEST_CODE_ADDR + layout.GUEST_CODE_MAX <= layout.GUEST_STACKS_ADDR
