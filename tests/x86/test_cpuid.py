"""Per-vCPU CPUID patching, on hand-made entries and on KVM's real supported set."""

import os

import pytest

from mpvmm.kvm.bindings_x86 import kvm_cpuid_entry2
from mpvmm.kvm.system import Kvm
from mpvmm.x86 import cpuid
from mpvmm.x86.cpuid import vcpu_cpuid


def _entries():
    return [
        kvm_cpuid_entry2(function=0x0, eax=0x1F, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        # EBX[15:0] = brand index 0x34, CLFLUSH size 0x12; a stale APIC id and count above.
        kvm_cpuid_entry2(function=0x1, eax=0xA10F11, ebx=0x7F40_1234, ecx=0x0000_2001, edx=0x0000_0001),
        kvm_cpuid_entry2(function=0xB, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=0x77),
        kvm_cpuid_entry2(function=0xB, index=1, flags=1, eax=4, ebx=8, ecx=0x201, edx=0x77),
        kvm_cpuid_entry2(function=0x1F, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=0x77),
        kvm_cpuid_entry2(function=0x80000001, ecx=0x21, edx=0x2C100800),
    ]


def _leaf(entries, function, index=0):
    (entry,) = [e for e in entries if e.function == function and e.index == index]
    return entry


def test_leaf1_carries_apic_id_and_logical_count():
    entries = vcpu_cpuid(_entries(), 5, 8)
    ebx = _leaf(entries, 0x1).ebx
    assert ebx >> 24 == 5  # initial APIC id
    assert (ebx >> 16) & 0xFF == 8  # logical processors per package
    assert ebx & 0xFFFF == 0x1234  # brand index and CLFLUSH size kept


def test_leaf1_sets_hypervisor_and_htt_and_keeps_other_bits():
    entries = vcpu_cpuid(_entries(), 0, 2)
    leaf = _leaf(entries, 0x1)
    assert leaf.ecx == 0x0000_2001 | cpuid.ECX_HYPERVISOR
    assert leaf.ecx & (1 << 31)
    assert leaf.edx == 0x0000_0001 | cpuid.EDX_HTT
    assert leaf.eax == 0xA10F11


def test_logical_count_saturates_at_255():
    ebx = _leaf(vcpu_cpuid(_entries(), 1, 300), 0x1).ebx
    assert (ebx >> 16) & 0xFF == 255
    assert ebx >> 24 == 1


@pytest.mark.parametrize("function", [0xB, 0x1F])
def test_topology_leaves_carry_the_x2apic_id_on_every_subleaf(function):
    entries = vcpu_cpuid(_entries(), 300, 512)
    for entry in entries:
        if entry.function == function:
            assert entry.edx == 300
    # Only EDX changes on these leaves.
    original = _leaf(_entries(), function, 0)
    patched = _leaf(entries, function, 0)
    assert (patched.eax, patched.ebx, patched.ecx) == (original.eax, original.ebx, original.ecx)


def test_other_leaves_are_untouched():
    before = _entries()
    after = vcpu_cpuid(before, 3, 4)
    for function in (0x0, 0x80000001):
        assert bytes(_leaf(after, function)) == bytes(_leaf(before, function))


def test_input_list_is_not_modified():
    supported = _entries()
    snapshot = [bytes(entry) for entry in supported]
    result = vcpu_cpuid(supported, 7, 8)
    assert [bytes(entry) for entry in supported] == snapshot
    assert len(result) == len(supported)
    assert all(out is not original for out, original in zip(result, supported))
    # Changing a result does not reach back into the input.
    _leaf(result, 0x1).eax = 0
    assert _leaf(supported, 0x1).eax == 0xA10F11


def test_each_vcpu_gets_its_own_apic_id():
    supported = _entries()
    apic_ids = [_leaf(vcpu_cpuid(supported, index, 4), 0x1).ebx >> 24 for index in range(4)]
    assert apic_ids == [0, 1, 2, 3]


needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs read-write /dev/kvm")


@pytest.fixture
def supported():
    with Kvm() as kvm:
        yield kvm.supported_cpuid()


@needs_kvm
def test_real_supported_cpuid_is_patched_per_vcpu(supported):
    snapshot = [bytes(entry) for entry in supported]
    patched = vcpu_cpuid(supported, 3, 4)
    assert [bytes(entry) for entry in supported] == snapshot
    assert [(e.function, e.index) for e in patched] == [(e.function, e.index) for e in supported]
    leaf1 = _leaf(patched, 0x1)
    assert leaf1.ebx >> 24 == 3
    assert (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ecx & cpuid.ECX_HYPERVISOR
    assert leaf1.edx & cpuid.EDX_HTT
    assert leaf1.ebx & 0xFFFF == _leaf(supported, 0x1).ebx & 0xFFFF
    for before, after in zip(supported, patched):
        if after.function in (0xB, 0x1F):
            assert after.edx == 3
        elif after.function != 0x1:
            assert bytes(after) == bytes(before)
