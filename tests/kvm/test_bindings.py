"""The ctypes layouts, constants and ioctl numbers against the installed linux/kvm.h.

A C program generated from the Python definitions prints ``sizeof`` and
``offsetof`` of every structure and member, every constant and every ioctl
number; each must equal the Python value.
"""

import ctypes
import shutil
import subprocess

import pytest

from mpvmm.kvm import bindings, ioctls
from mpvmm.kvm.ioctls import IO, IOR, IOW, IOWR, KVMIO, _IOC

# Exit reasons newer than some installed headers; absent from an older header
# they are skipped, present they are checked like every other constant.
NEWER_THAN_SOME_HEADERS = {"KVM_EXIT_LOONGARCH_IOCSR", "KVM_EXIT_MEMORY_FAULT"}


def members(ctype: type, c_path: str = "", base: int = 0):
    """(C member path, offset, size) of every member of ``ctype``, nested ones too.

    Anonymous members are walked through, as C names their members directly
    (``io.port`` in kvm_run); bitfields are skipped, offsetof cannot take them.
    """
    anonymous = set(getattr(ctype, "_anonymous_", ()))
    for field in ctype._fields_:
        if len(field) == 3:
            continue
        name, field_type = field[0], field[1]
        descriptor = getattr(ctype, name)
        offset = base + descriptor.offset
        if name in anonymous:
            yield from members(field_type, c_path, offset)
            continue
        path = f"{c_path}.{name}" if c_path else name
        yield path, offset, descriptor.size
        if issubclass(field_type, (ctypes.Structure, ctypes.Union)):
            yield from members(field_type, path, offset)


def int_constants(module, prefixes=("KVM_", "SYNC_REGS_")) -> dict[str, int]:
    return {
        name: value
        for name, value in vars(module).items()
        if name.startswith(prefixes) and isinstance(value, int) and not isinstance(value, bool)
    }


def c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>"]
    lines.append("int main(void) {")
    for struct in bindings.STRUCTURES:
        name = struct.__name__
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
        for path, _, _ in members(struct):
            lines.append(f'printf("offset {name}.{path} %zu\\n", offsetof(struct {name}, {path}));')
            lines.append(
                f'printf("size {name}.{path} %zu\\n", sizeof(((struct {name} *)0)->{path}));'
            )
    for name in int_constants(bindings):
        lines.append(f'#ifdef {name}\nprintf("const {name} %lld\\n", (long long)({name}));\n#endif')
    for name in int_constants(ioctls):
        lines.append(f'printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to compare the layouts with linux/kvm.h")
    workdir = tmp_path_factory.mktemp("kvm_layout")
    source, binary = workdir / "layout.c", workdir / "layout"
    source.write_text(c_program())
    subprocess.run([gcc, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    values = {}
    for line in output.splitlines():
        kind, name, value = line.split()
        values[f"{kind} {name}"] = int(value)
    return values


@pytest.mark.parametrize("struct", bindings.STRUCTURES, ids=lambda s: s.__name__)
def test_structure_layout_matches_kernel(c_values, struct):
    name = struct.__name__
    expected = {f"size {name}": ctypes.sizeof(struct)}
    for path, offset, size in members(struct):
        expected[f"offset {name}.{path}"] = offset
        expected[f"size {name}.{path}"] = size
    assert {key: c_values[key] for key in expected} == expected


def test_constants_match_kernel(c_values):
    ours = int_constants(bindings)
    missing = {name for name in ours if f"const {name}" not in c_values}
    assert missing <= NEWER_THAN_SOME_HEADERS
    assert {n: c_values[f"const {n}"] for n in ours if n not in missing} == {
        n: v for n, v in ours.items() if n not in missing
    }


def test_ioctl_numbers_match_kernel(c_values):
    ours = int_constants(ioctls)
    assert {"KVM_RUN", "KVM_GET_REGS", "KVM_SET_USER_MEMORY_REGION",
            "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_PIT2"} <= ours.keys()  # fmt: skip
    assert {name: c_values[f"const {name}"] for name in ours} == ours


def test_kvm_regs_is_144_bytes():
    assert ctypes.sizeof(bindings.kvm_regs) == 144


def test_kvm_run_exit_union_is_256_bytes():
    exit_union = bindings.kvm_run._exit
    assert exit_union.size == 256
    assert bindings.kvm_run.kvm_valid_regs.offset == exit_union.offset + 256


def test_anonymous_members_read_through():
    run = bindings.kvm_run()
    run.io.port = 0x3F8
    run.system_event.data[0] = 7
    assert run.io.port == 0x3F8
    assert run.system_event.flags == 7  # flags and data[0] share their bytes


def test_flexible_array_helpers():
    cpuid = bindings.cpuid2_type(3)
    assert ctypes.sizeof(cpuid) == 8 + 3 * ctypes.sizeof(bindings.kvm_cpuid_entry2)
    assert bindings.cpuid2_type(3) is cpuid
    assert ctypes.sizeof(bindings.msrs_type(2)) == 8 + 2 * 16
    assert ctypes.sizeof(bindings.msr_list_type(5)) == 4 + 5 * 4


def test_exit_reason_names():
    names = bindings.EXIT_REASON_NAMES
    assert names[bindings.KVM_EXIT_IO] == "io"
    assert names[bindings.KVM_EXIT_MMIO] == "mmio"
    assert names[bindings.KVM_EXIT_HLT] == "hlt"
    assert names[bindings.KVM_EXIT_SHUTDOWN] == "shutdown"
    assert names[bindings.KVM_EXIT_FAIL_ENTRY] == "fail_entry"
    assert names[bindings.KVM_EXIT_INTR] == "intr"
    assert names[bindings.KVM_EXIT_INTERNAL_ERROR] == "internal_error"
    assert names[bindings.KVM_EXIT_SYSTEM_EVENT] == "system_event"
    assert len(set(names.values())) == len(names)


def test_ioc_encoding():
    assert IO(KVMIO, 0x80) == 0xAE80
    # direction in bits 30-31, size in bits 16-29
    assert IOR(KVMIO, 0x81, bindings.kvm_regs) == 2 << 30 | 144 << 16 | 0xAE << 8 | 0x81
    assert IOW(KVMIO, 0x82, bindings.kvm_regs) == 1 << 30 | 144 << 16 | 0xAE81 + 1
    assert IOWR(KVMIO, 0x05, bindings.kvm_cpuid2) == 3 << 30 | 8 << 16 | 0xAE05


@pytest.mark.parametrize("args", [(4, 0xAE, 0, 0), (0, 0x100, 0, 0), (0, 0xAE, 0x100, 0),
                                  (0, 0xAE, 0, 1 << 14)])  # fmt: skip
def test_ioc_refuses_fields_that_overflow(args):
    with pytest.raises(ValueError):
        _IOC(*args)
