"""KVM's ioctls: their request numbers, and the one call every fd object makes.

A request number packs the transfer direction, the argument size, a type byte
and a command number the way asm-generic/ioctl.h does, so ``IOR(KVMIO, 0x81,
kvm_regs)`` here is ``_IOR(KVMIO, 0x81, struct kvm_regs)`` in C and no number
is ever pasted in by hand. The numbers mpvmm uses are grouped by the file
descriptor they are issued on (api.rst: "system", "vm" and "vcpu" ioctls);
tests/kvm/test_bindings.py checks each against C. ``ioctl`` issues one and
turns a failure into a ``KvmIoctlError`` naming it.
"""

import ctypes
import errno
import fcntl
import os
from ctypes import c_uint64

from mpvmm.errors import KvmIoctlError
from mpvmm.kvm import bindings as b

# Field widths and positions of asm-generic/ioctl.h (x86 uses the generic
# layout: 8-bit nr, 8-bit type, 14-bit size, 2-bit direction).
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

# Direction as seen from user space: WRITE means the kernel reads our buffer.
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

# The type byte of every KVM ioctl (linux/kvm.h).
KVMIO = 0xAE


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:  # noqa: N802
    """Pack one request number; refuse fields that would spill into others."""
    if not 0 <= direction < 1 << _IOC_DIRBITS:
        raise ValueError(f"ioctl direction {direction} out of range")
    if not 0 <= type_ < 1 << _IOC_TYPEBITS:
        raise ValueError(f"ioctl type {type_:#x} out of range")
    if not 0 <= nr < 1 << _IOC_NRBITS:
        raise ValueError(f"ioctl number {nr:#x} out of range")
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} out of range")
    return (
        direction << _IOC_DIRSHIFT
        | type_ << _IOC_TYPESHIFT
        | nr << _IOC_NRSHIFT
        | size << _IOC_SIZESHIFT
    )


def IO(type_: int, nr: int) -> int:  # noqa: N802
    """A request without a buffer argument (``_IO``)."""
    return _IOC(IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, ctype: type) -> int:  # noqa: N802
    """A request whose buffer the kernel fills (``_IOR``)."""
    return _IOC(IOC_READ, type_, nr, ctypes.sizeof(ctype))


def IOW(type_: int, nr: int, ctype: type) -> int:  # noqa: N802
    """A request whose buffer the kernel reads (``_IOW``)."""
    return _IOC(IOC_WRITE, type_, nr, ctypes.sizeof(ctype))


def IOWR(type_: int, nr: int, ctype: type) -> int:  # noqa: N802
    """A request whose buffer goes both ways (``_IOWR``)."""
    return _IOC(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(ctype))

# --- /dev/kvm ---
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)  # returns a VM fd
KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, b.kvm_msr_list)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)  # in bytes
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, b.kvm_cpuid2)

# --- VM fd ---
KVM_CREATE_VCPU = IO(KVMIO, 0x41)  # returns a vCPU fd
KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, b.kvm_dirty_log)  # IOW, but KVM writes the bitmap it points to
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, b.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, c_uint64)
KVM_REGISTER_COALESCED_MMIO = IOW(KVMIO, 0x67, b.kvm_coalesced_mmio_zone)
KVM_UNREGISTER_COALESCED_MMIO = IOW(KVMIO, 0x68, b.kvm_coalesced_mmio_zone)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_GET_IRQCHIP = IOWR(KVMIO, 0x62, b.kvm_irqchip)
KVM_SET_IRQCHIP = IOR(KVMIO, 0x63, b.kvm_irqchip)  # sic: _IOR in linux/kvm.h, though KVM reads it
KVM_IRQFD = IOW(KVMIO, 0x76, b.kvm_irqfd)
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, b.kvm_pit_config)
KVM_IOEVENTFD = IOW(KVMIO, 0x79, b.kvm_ioeventfd)
KVM_SET_CLOCK = IOW(KVMIO, 0x7B, b.kvm_clock_data)
KVM_GET_CLOCK = IOR(KVMIO, 0x7C, b.kvm_clock_data)
KVM_GET_PIT2 = IOR(KVMIO, 0x9F, b.kvm_pit_state2)
KVM_SET_PIT2 = IOW(KVMIO, 0xA0, b.kvm_pit_state2)
KVM_GET_STATS_FD = IO(KVMIO, 0xCE)  # also valid on a vCPU fd

# --- vCPU fd ---
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, b.kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, b.kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, b.kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, b.kvm_sregs)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, b.kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, b.kvm_msrs)
KVM_GET_FPU = IOR(KVMIO, 0x8C, b.kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, b.kvm_fpu)
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, b.kvm_lapic_state)
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, b.kvm_lapic_state)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, b.kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, b.kvm_cpuid2)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, b.kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, b.kvm_mp_state)
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, b.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, b.kvm_vcpu_events)
KVM_GET_DEBUGREGS = IOR(KVMIO, 0xA1, b.kvm_debugregs)
KVM_SET_DEBUGREGS = IOW(KVMIO, 0xA2, b.kvm_debugregs)
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, b.kvm_xsave)
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, b.kvm_xsave)
KVM_GET_XCRS = IOR(KVMIO, 0xA6, b.kvm_xcrs)
KVM_SET_XCRS = IOW(KVMIO, 0xA7, b.kvm_xcrs)
KVM_GET_XSAVE2 = IOR(KVMIO, 0xCF, b.kvm_xsave)  # the buffer is KVM_CAP_XSAVE2 bytes long

# fcntl.ioctl passes an int argument as a C int, too narrow for values such
# as KVM_SET_TSS_ADDR's 0xfffbd000; those go through libc's ioctl as an
# unsigned long. CDLL (not PyDLL) calls release the GIL like fcntl does.
_C_INT_MIN, _C_INT_MAX = -(2**31), 2**31 - 1
_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc_ioctl.restype = ctypes.c_int


def ioctl(fd: int, name: str, request: int, arg=0, *, interruptible: bool = False) -> int:
    """Issue one ioctl and return its result; a failure raises KvmIoctlError(name).

    ``arg`` is an int passed by value or a ctypes object passed by reference
    (fcntl copies one of up to 1 KiB through a buffer and back). With
    ``interruptible``, EINTR is raised as-is as ``InterruptedError``.
    """
    try:
        if isinstance(arg, int) and not _C_INT_MIN <= arg <= _C_INT_MAX:
            result = _libc_ioctl(fd, request, arg)
            if result < 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
            return result
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        if interruptible and err.errno == errno.EINTR:
            raise  # an InterruptedError, by OSError's errno mapping
        raise KvmIoctlError(name, err.errno, err.strerror) from err

