"""ctypes mirrors of the linux/kvm.h structures and constants mpvmm uses (x86-64).

Names and field names are the kernel's, so Documentation/virt/kvm/api.rst
reads straight onto this code. Written by hand from linux/kvm.h; the x86 CPU
state of asm/kvm.h lives in ``bindings_x86`` and is re-exported here, so this
module is the one to import. tests/kvm/test_bindings.py compiles a C program
against the installed headers and checks every size, offset and constant.

Two deliberate departures: ``char`` arrays are ``c_uint8`` arrays, because
ctypes turns a ``c_char`` array into ``bytes`` cut at the first NUL, and
anonymous C unions and structs are ctypes fields whose names start with an
underscore and are listed in ``_anonymous_``, so ``run.io.port`` works.
"""

import ctypes
from ctypes import Structure, Union
from ctypes import c_int16 as s16
from ctypes import c_int32 as s32
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64

from mpvmm.kvm.bindings_x86 import (  # noqa: F401  (re-exported)
    KVM_APIC_REG_SIZE,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_IOAPIC_NUM_PINS,
    KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_XCRS,
    KVM_NR_INTERRUPTS,
    KVM_NR_IRQCHIPS,
    KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT,
    cpuid2_type,
    kvm_cpuid2,
    kvm_cpuid_entry2,
    kvm_debug_exit_arch,
    kvm_debugregs,
    kvm_dtable,
    kvm_fpu,
    kvm_ioapic_state,
    kvm_lapic_state,
    kvm_msr_entry,
    kvm_msr_list,
    kvm_msrs,
    kvm_pic_state,
    kvm_pit_channel_state,
    kvm_pit_state2,
    kvm_regs,
    kvm_segment,
    kvm_sregs,
    kvm_vcpu_events,
    kvm_xcr,
    kvm_xcrs,
    kvm_xsave,
    msr_list_type,
    msrs_type,
    xsave_type,
)

KVM_API_VERSION = 12

# --- linux/kvm.h: VM set-up -----------------------------------------------------


class kvm_userspace_memory_region(Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]  # fmt: skip


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1


class kvm_pit_config(Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


KVM_PIT_SPEAKER_DUMMY = 1


class kvm_mp_state(Structure):
    _fields_ = [("mp_state", u32)]


# Not every state is valid on every architecture (api.rst, KVM_GET_MP_STATE).
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_STOPPED = 5
KVM_MP_STATE_CHECK_STOP = 6
KVM_MP_STATE_OPERATING = 7
KVM_MP_STATE_LOAD = 8
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_MP_STATE_SUSPENDED = 10


class kvm_ioeventfd(Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32),
                ("flags", u32), ("pad", u8 * 36)]  # fmt: skip


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irqfd(Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1


# --- linux/kvm.h: coalesced MMIO (and PIO) ---------------------------------------


class _kvm_coalesced_pio(Union):
    _fields_ = [("pad", u32), ("pio", u32)]


class kvm_coalesced_mmio_zone(Structure):
    """A range whose writes KVM appends to the VM's coalesced ring instead of exiting."""

    _anonymous_ = ("_u",)
    _fields_ = [("addr", u64), ("size", u32), ("_u", _kvm_coalesced_pio)]


class kvm_coalesced_mmio(Structure):
    """One entry of the ring: a write KVM took without an exit."""

    _anonymous_ = ("_u",)
    _fields_ = [("phys_addr", u64), ("len", u32), ("_u", _kvm_coalesced_pio), ("data", u8 * 8)]


class kvm_coalesced_mmio_ring(Structure):
    """The ring page's header; ``COALESCED_RING_ENTRIES`` entries follow it."""

    _fields_ = [("first", u32), ("last", u32)]


COALESCED_RING_PAGE_SIZE = 4096  # the ring is one page (PAGE_SIZE on x86-64)
# KVM_COALESCED_MMIO_MAX of linux/kvm.h, which needs the kernel's PAGE_SIZE to expand.
COALESCED_RING_ENTRIES = (COALESCED_RING_PAGE_SIZE - ctypes.sizeof(kvm_coalesced_mmio_ring)) // ctypes.sizeof(kvm_coalesced_mmio)
# --- linux/kvm.h: state save and restore, dirty logging ---------------------------


class _kvm_irqchip_chip(Union):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Structure):
    """One chip of the in-kernel irqchip, chosen by ``chip_id`` (KVM_IRQCHIP_*)."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _kvm_irqchip_chip)]


class kvm_clock_data(Structure):
    """The VM's kvmclock (KVM_GET_CLOCK): nanoseconds, and with flags the host's realtime and TSC."""

    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
                ("pad", u32 * 4)]  # fmt: skip


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_dirty_log(Structure):
    """A memslot's dirty bitmap (one bit per page), written at ``dirty_bitmap``, a host address."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


# --- linux/kvm.h: binary statistics (api.rst, KVM_GET_STATS_FD) ----------------


class kvm_stats_header(Structure):
    _fields_ = [(name, u32) for name in (
        "flags", "name_size", "num_desc", "id_offset", "desc_offset", "data_offset")]  # fmt: skip


class kvm_stats_desc(Structure):
    """The fixed part; a NUL-padded name of ``name_size`` bytes follows it."""

    _fields_ = [("flags", u32), ("exponent", s16), ("size", u16), ("offset", u32),
                ("bucket_size", u32)]  # fmt: skip


KVM_STATS_TYPE_SHIFT = 0
KVM_STATS_TYPE_MASK = 0xF << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_CUMULATIVE = 0x0 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_INSTANT = 0x1 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_PEAK = 0x2 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LINEAR_HIST = 0x3 << KVM_STATS_TYPE_SHIFT
KVM_STATS_TYPE_LOG_HIST = 0x4 << KVM_STATS_TYPE_SHIFT

KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT

KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT

# --- linux/kvm.h: capabilities mpvmm asks about (KVM_CHECK_EXTENSION) ----------

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15  # its value is the ring's page offset in a vCPU fd's mmap
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_XSAVE2 = 208

# --- linux/kvm.h: exits ----------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15  # deprecated
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
# Newer than some installed headers (6.7 and 6.8); the layout test skips
# constants the header does not define.
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39

# Short names for logs and metrics ("io", "hlt", "fail_entry", ...), built from
# the constants just above so the two can never disagree.
EXIT_REASON_NAMES: dict[int, str] = {
    value: name.removeprefix("KVM_EXIT_").lower()
    for name, value in list(globals().items())
    if name.startswith("KVM_EXIT_")
}


def exit_reason_name(reason: int) -> str:
    """``"io"`` for KVM_EXIT_IO; the number itself for a reason newer than this table."""
    return EXIT_REASON_NAMES.get(reason, str(reason))


# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# kvm_run.msr.reason
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2


# --- linux/kvm.h: struct kvm_run, the page shared with KVM_RUN -------------------
# The members of the exit union are anonymous structs in C; their classes here
# are named _kvm_run_<member> to say they have no kernel name.


class _kvm_run_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _kvm_run_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _kvm_run_io(Structure):
    # The data of all ``count`` accesses lies at data_offset from the start of
    # the kvm_run page, not inside this struct.
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]  # fmt: skip


class _kvm_run_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _kvm_run_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _kvm_run_hypercall(Structure):
    _fields_ = [("nr", u64), ("args", u64 * 6), ("ret", u64), ("longmode", u32),
                ("pad", u32)]  # fmt: skip


class _kvm_run_tpr_access(Structure):
    _fields_ = [("rip", u64), ("is_write", u32), ("pad", u32)]


class _kvm_run_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _kvm_run_emulation_failure_insn(Structure):
    _fields_ = [("insn_size", u8), ("insn_bytes", u8 * 15)]


class _kvm_run_emulation_failure_u(Union):
    _anonymous_ = ("_insn",)
    _fields_ = [("_insn", _kvm_run_emulation_failure_insn)]


class _kvm_run_emulation_failure(Structure):
    # An ABI overlay of ``internal`` for KVM_INTERNAL_ERROR_EMULATION.
    _anonymous_ = ("_u",)
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64),
                ("_u", _kvm_run_emulation_failure_u)]  # fmt: skip


class _kvm_run_system_event_u(Union):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class _kvm_run_system_event(Structure):
    _anonymous_ = ("_u",)
    _fields_ = [("type", u32), ("ndata", u32), ("_u", _kvm_run_system_event_u)]


class _kvm_run_msr(Structure):
    _fields_ = [
        ("error", u8),  # user -> kernel
        ("pad", u8 * 7),
        ("reason", u32),  # kernel -> user
        ("index", u32),  # kernel -> user
        ("data", u64),  # both ways
    ]


class _kvm_run_notify(Structure):
    _fields_ = [("flags", u32)]


class _kvm_run_exit(Union):
    # The kernel pads this union to 256 bytes; members we never read (s390,
    # PowerPC, RISC-V, Hyper-V, Xen) live only in that padding.
    _fields_ = [
        ("hw", _kvm_run_hw),
        ("fail_entry", _kvm_run_fail_entry),
        ("ex", _kvm_run_ex),
        ("io", _kvm_run_io),
        ("debug", _kvm_run_debug),
        ("mmio", _kvm_run_mmio),
        ("hypercall", _kvm_run_hypercall),
        ("tpr_access", _kvm_run_tpr_access),
        ("internal", _kvm_run_internal),
        ("emulation_failure", _kvm_run_emulation_failure),
        ("system_event", _kvm_run_system_event),
        ("msr", _kvm_run_msr),
        ("notify", _kvm_run_notify),
        ("padding", u8 * 256),
    ]


SYNC_REGS_SIZE_BYTES = 2048


class _kvm_run_s(Union):
    # kvm_sync_regs (only with KVM_CAP_SYNC_REGS, which mpvmm does not use)
    # is left to this padding.
    _fields_ = [("padding", u8 * SYNC_REGS_SIZE_BYTES)]


class kvm_run(Structure):
    _anonymous_ = ("_exit",)
    _fields_ = [
        # in
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        # out
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        # in (before KVM_RUN), out (after)
        ("cr8", u64),
        ("apic_base", u64),
        ("_exit", _kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", _kvm_run_s),
    ]


# Every structure above that has a kernel name, for the layout test.
STRUCTURES: tuple[type, ...] = (
    kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu, kvm_cpuid_entry2,
    kvm_cpuid2, kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_lapic_state,
    kvm_debug_exit_arch, kvm_userspace_memory_region,
    kvm_pit_config, kvm_mp_state, kvm_ioeventfd, kvm_irqfd,
    kvm_coalesced_mmio_zone, kvm_coalesced_mmio, kvm_coalesced_mmio_ring,
    kvm_stats_header, kvm_stats_desc, kvm_run,
    kvm_pic_state, kvm_ioapic_state, kvm_irqchip, kvm_pit_channel_state, kvm_pit_state2,
    kvm_clock_data, kvm_vcpu_events, kvm_debugregs, kvm_xsave, kvm_xcr, kvm_xcrs, kvm_dirty_log,
)  # fmt: skip

assert ctypes.sizeof(_kvm_run_exit) == 256, "the kvm_run exit union must stay 256 bytes"
