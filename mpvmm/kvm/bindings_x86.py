"""ctypes mirrors of the asm/kvm.h structures mpvmm uses (x86-64 CPU state).

The x86 half of the bindings, split off as the kernel splits its headers;
``mpvmm.kvm.bindings`` re-exports every name here, so import from there.
The same conventions hold: kernel names, ``c_uint8`` for ``char`` arrays,
and tests/kvm/test_bindings.py checks each size and offset against C.
"""

import functools
from ctypes import Structure
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64


class kvm_regs(Structure):
    _fields_ = [
        (name, u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    _fields_ = (
        [(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
        + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))]
    )


class kvm_fpu(Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_cpuid_entry2(Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling


class kvm_cpuid2(Structure):
    """The header only; ``cpuid2_type(nent)`` adds the entries array."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_msr_entry(Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Structure):
    """The header only; ``msrs_type(n)`` adds the entries array."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(Structure):
    """The header only; ``msr_list_type(n)`` adds the indices array."""

    _fields_ = [("nmsrs", u32)]


KVM_APIC_REG_SIZE = 0x400


class kvm_lapic_state(Structure):
    _fields_ = [("regs", u8 * KVM_APIC_REG_SIZE)]


class kvm_debug_exit_arch(Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


def _with_array(header: type, field: str, item: type, count: int) -> type:
    """A fixed-size variant of a struct that ends in a flexible array."""
    return type(
        f"{header.__name__}_{count}",
        (Structure,),
        {"_fields_": list(header._fields_) + [(field, item * count)]},
    )


@functools.lru_cache(maxsize=None)
def cpuid2_type(nent: int) -> type:
    """``struct kvm_cpuid2`` with room for ``nent`` entries."""
    return _with_array(kvm_cpuid2, "entries", kvm_cpuid_entry2, nent)


@functools.lru_cache(maxsize=None)
def msrs_type(nmsrs: int) -> type:
    """``struct kvm_msrs`` with room for ``nmsrs`` entries."""
    return _with_array(kvm_msrs, "entries", kvm_msr_entry, nmsrs)


@functools.lru_cache(maxsize=None)
def msr_list_type(nmsrs: int) -> type:
    """``struct kvm_msr_list`` with room for ``nmsrs`` indices."""
    return _with_array(kvm_msr_list, "indices", u32, nmsrs)
