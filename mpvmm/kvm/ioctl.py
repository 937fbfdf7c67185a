"""ioctl request numbers built the way asm-generic/ioctl.h builds them.

A request packs the transfer direction, the argument size, a type byte and a
command number, so ``IOR(KVMIO, 0x81, kvm_regs)`` here is ``_IOR(KVMIO, 0x81,
struct kvm_regs)`` in C and no number is ever pasted in by hand.
"""

import ctypes

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
