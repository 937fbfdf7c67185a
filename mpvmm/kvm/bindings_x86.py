"""ctypes mirrors of the asm/kvm.h structures mpvmm uses (x86-64 CPU state).

The x86 half of the bindings, split off as the kernel splits its headers;
``mpvmm.kvm.bindings`` re-exports every name here, so import from there.
The same conventions hold: kernel names, ``c_uint8`` for ``char`` arrays,
and tests/kvm/test_bindings.py checks each size and offset against C.
"""

import ctypes
import functools
from ctypes import Structure, Union
from ctypes import c_int64 as s64
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


# --- State save and restore (snapshots, migration) -----------------------------


class kvm_pic_state(Structure):
    """One i8259 of the in-kernel irqchip (KVM_IRQCHIP_PIC_MASTER or _SLAVE)."""

    _fields_ = [(name, u8) for name in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
        "init4", "elcr", "elcr_mask")]  # fmt: skip


KVM_IOAPIC_NUM_PINS = 24


class _kvm_ioapic_redirtbl_fields(Structure):
    _fields_ = [("vector", u8), ("delivery_mode", u8, 3), ("dest_mode", u8, 1),
                ("delivery_status", u8, 1), ("polarity", u8, 1), ("remote_irr", u8, 1),
                ("trig_mode", u8, 1), ("mask", u8, 1), ("reserve", u8, 7),
                ("reserved", u8 * 4), ("dest_id", u8)]  # fmt: skip


class _kvm_ioapic_redirtbl(Union):
    # An anonymous union in C, one per pin: the raw entry or its fields.
    _fields_ = [("bits", u64), ("fields", _kvm_ioapic_redirtbl_fields)]


class kvm_ioapic_state(Structure):
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32), ("pad", u32),
                ("redirtbl", _kvm_ioapic_redirtbl * KVM_IOAPIC_NUM_PINS)]  # fmt: skip


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3


class kvm_pit_channel_state(Structure):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
                ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8),
                ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8),
                ("count_load_time", s64)]  # fmt: skip


class kvm_pit_state2(Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class _kvm_vcpu_events_exception(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]  # fmt: skip


class _kvm_vcpu_events_interrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _kvm_vcpu_events_nmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _kvm_vcpu_events_smi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _kvm_vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Structure):
    """Pending and injected exceptions, interrupts, NMIs and SMIs (KVM_GET_VCPU_EVENTS)."""

    _fields_ = [("exception", _kvm_vcpu_events_exception), ("interrupt", _kvm_vcpu_events_interrupt),
                ("nmi", _kvm_vcpu_events_nmi), ("sipi_vector", u32), ("flags", u32),
                ("smi", _kvm_vcpu_events_smi), ("triple_fault", _kvm_vcpu_events_triple_fault),
                ("reserved", u8 * 26), ("exception_has_payload", u8),
                ("exception_payload", u64)]  # fmt: skip


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020


class kvm_debugregs(Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xsave(Structure):
    """The 4 KiB XSAVE image; ``xsave_type(size)`` adds the ``extra`` of KVM_GET_XSAVE2."""

    _fields_ = [("region", u32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


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


@functools.lru_cache(maxsize=None)
def xsave_type(size: int) -> type:
    """``struct kvm_xsave`` of ``size`` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)), at least 4096."""
    extra = (size - ctypes.sizeof(kvm_xsave)) // 4
    return kvm_xsave if extra <= 0 else _with_array(kvm_xsave, "extra", u32, extra)
