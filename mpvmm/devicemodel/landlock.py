"""Landlock (linux/landlock.h): a process gives up the filesystem, TCP and foreign signals.

Landlock is an unprivileged LSM: a process builds a ruleset naming the
access rights it *handles*, grants some of them beneath chosen paths, and
restricts itself for good (children inherit it). A handled right with no
rule granting it is denied everywhere. The device model handles every right
its kernel knows and grants none: once restricted it cannot open, create,
remove, rename, truncate or link any file, bind or connect a TCP socket, or
(ABI 6) signal a process outside its own domain or reach an abstract unix
socket. Files it already has (the console, guest RAM, its queues) are not
affected: Landlock checks at open time.

Each kernel release adds rights and says so with an ABI version; asking
for a right the kernel does not know is EINVAL, so the ruleset is built
from the version the kernel reports. Version 0 means no Landlock at all
(not built, or not in the boot's ``lsm=`` list).
"""

from __future__ import annotations

import ctypes
import errno
import os

# The syscall numbers are the same on every architecture (added after 5.1's unification).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0

# Filesystem rights by the ABI version that introduced them.
ACCESS_FS_BY_ABI = {
    1: (1 << 13) - 1,  # EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_{CHAR,DIR,REG,SOCK,FIFO,BLOCK,SYM}
    2: 1 << 13,  # REFER: link or rename across directories
    3: 1 << 14,  # TRUNCATE
    5: 1 << 15,  # IOCTL_DEV: ioctl on a device file opened later
}
ABI_NET = 4
ACCESS_NET_BIND_TCP = 1 << 0
ACCESS_NET_CONNECT_TCP = 1 << 1
ABI_SCOPED_SIGNALS = 6
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    """struct landlock_ruleset_attr; a kernel reads only the fields its ABI has."""

    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),  # ABI 1
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when it has none."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)  # ENOSYS: not built; EOPNOTSUPP: disabled at boot


def _ruleset_for(abi: int) -> tuple[_RulesetAttr, int]:
    """Everything ``abi`` can handle, and the size of the structure that ABI reads."""
    attr = _RulesetAttr(handled_access_fs=sum(rights for version, rights in ACCESS_FS_BY_ABI.items() if version <= abi))
    size = _RulesetAttr.handled_access_net.offset
    if abi >= ABI_NET:
        attr.handled_access_net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
        size = _RulesetAttr.scoped.offset
    if abi >= ABI_SCOPED_SIGNALS:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = ctypes.sizeof(_RulesetAttr)
    return attr, size


def create_ruleset(abi: int) -> int:
    """A ruleset fd handling everything ``abi`` knows, granting nothing (not yet applied)."""
    attr, size = _ruleset_for(abi)
    ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"landlock_create_ruleset (ABI {abi}): {os.strerror(code)}")
    return int(ruleset)


def deny_everything() -> int:
    """Restrict this process to no filesystem, no TCP, no foreign signals; the ABI used (0: none).

    Needs PR_SET_NO_NEW_PRIVS first (or CAP_SYS_ADMIN), as seccomp does.
    """
    abi = abi_version()
    if abi == 0:
        return 0
    ruleset = create_ruleset(abi)
    try:
        if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            code = ctypes.get_errno()
            hint = " (PR_SET_NO_NEW_PRIVS first)" if code == errno.EPERM else ""
            raise OSError(code, f"landlock_restrict_self: {os.strerror(code)}{hint}")
    finally:
        os.close(ruleset)
    return abi
