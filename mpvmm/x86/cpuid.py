"""Per-vCPU CPUID: KVM's supported set with each vCPU's own APIC id and topology."""

import copy

from mpvmm.kvm.bindings_x86 import kvm_cpuid_entry2

LEAF_FEATURES = 0x1
LEAF_EXTENDED_TOPOLOGY = 0xB
LEAF_V2_EXTENDED_TOPOLOGY = 0x1F
ECX_HYPERVISOR = 1 << 31  # leaf 1: "running under a hypervisor"
EBX_APIC_ID_SHIFT = 24
EBX_LOGICAL_COUNT_SHIFT = 16
EDX_HTT = 1 << 28  # leaf 1: the logical-processor count in EBX[23:16] is valid


def vcpu_cpuid(supported: list[kvm_cpuid_entry2], index: int, cpus: int) -> list[kvm_cpuid_entry2]:
    """Copies of ``supported`` patched for vCPU ``index`` of ``cpus``.

    The APIC id is the vCPU index, in leaf 1 and as the x2APIC id of the
    topology leaves, and leaf 1 counts ``cpus`` logical processors. The rest
    of the topology leaves (level shifts and counts) stay as KVM reports them.
    """
    entries = [copy.copy(entry) for entry in supported]
    for entry in entries:
        if entry.function == LEAF_FEATURES:
            entry.ebx = (entry.ebx & 0x0000FFFF) | (index << EBX_APIC_ID_SHIFT) | (
                min(cpus, 255) << EBX_LOGICAL_COUNT_SHIFT
            )
            entry.ecx |= ECX_HYPERVISOR
            entry.edx |= EDX_HTT
        elif entry.function in (LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY):
            entry.edx = index  # the x2APIC id, on every sub-leaf
    return entries
