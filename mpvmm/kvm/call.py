"""Issuing one KVM ioctl: the call every fd object in system.py and vcpu.py makes."""

import ctypes
import errno
import fcntl
import os

from mpvmm.errors import KvmIoctlError

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


def host_address(buffer) -> int:
    """The host address of a writable buffer's first byte (an mmap, a bytearray).

    Holds no export of the buffer, so it can still be closed: the caller keeps
    it alive and mapped for as long as KVM or C code uses the address.
    """
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view
