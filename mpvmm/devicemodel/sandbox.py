"""What the device model gives up once it has opened everything it needs.

The device model parses messages shaped by the guest, so it is the process a
hostile guest would attack. After ``configure`` it holds every fd it will
ever use (guest RAM, its queues, the console, the control socket, irqfds,
the terminal), so it gives up the rest, as Firecracker's jailer and
crosvm's minijail do for their device processes, in two steps:

``drop_privileges()``
    Started as root (as the supervisor usually is, to open /dev/kvm; the
    device model is its child), it becomes ``nobody``: no
    supplementary groups, gid and uid set for good (real, effective, saved,
    filesystem), an empty capability bounding set, and no capabilities in
    any set. A uid change also makes the process non-dumpable, so no other
    ``nobody`` process can ptrace it or open its ``/proc/<pid>/mem``.
    Started as another user it keeps that uid and its groups (dropping
    either needs a capability it should not have) and clears its
    capabilities; the two steps below still apply.

``restrict()``
    ``PR_SET_NO_NEW_PRIVS``; Landlock with every right handled and none
    granted (landlock.py: no file can be opened, no TCP used, no signal
    sent outside the process), where the kernel has it; then the seccomp
    allow-list (syscall_filter.py), which also denies io_uring.

Before both, ``map_guest_ram`` maps guest RAM read-only through a
read-only descriptor (unless the device model writes guest memory), so not
even ``mprotect`` could make it writable.
The result, with a note for each thing this host could not do, is returned
as a ``Confinement`` and reported in the ``ready`` message.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pwd
from dataclasses import asdict, dataclass, field

from mpvmm.devicemodel import landlock, syscall_filter

SANDBOX_USER = "nobody"
NOBODY_ID = 65534  # where /etc/passwd has no nobody
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_CAPSET = 126  # x86-64
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")  # and CapBnd, which only root can empty

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """The kernel refused to confine the process."""


@dataclass
class Confinement:
    """What the sandbox did, for the ``ready`` message."""

    uid: int
    gid: int
    landlock_abi: int = 0  # 0: none applied
    allowed_syscalls: int = 0  # 0: no seccomp filter
    notes: list[str] = field(default_factory=list)

    def as_message(self) -> dict:
        return asdict(self)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise SandboxError(code, f"{what} failed: {os.strerror(code)}")


def _sandbox_ids() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return NOBODY_ID, NOBODY_ID


def _capability_count() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read()) + 1


def _clear_capabilities() -> None:
    """No capability in the effective, permitted, inheritable or ambient sets."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: two 32-bit halves of each set
    if _libc.syscall(SYS_CAPSET, ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise SandboxError(code, f"capset: {os.strerror(code)}")


def _check_no_capabilities(sets: tuple[str, ...]) -> None:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    left = [name for name in sets if int(status.get(name, "0"), 16)]
    if left:
        raise SandboxError(f"capabilities left after dropping them: {', '.join(left)}")


def map_guest_ram(fd: int, size: int, writable: bool) -> mmap.mmap:
    """Guest RAM, read-only unless this device model writes guest memory.

    Read-only through a descriptor of our own opened read-only: the inherited
    one is read-write, and with it a later mprotect could make the mapping
    writable again; with this one the kernel refuses (EACCES).
    """
    if writable:
        return mmap.mmap(fd, size)
    read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(read_only, size, prot=mmap.PROT_READ)
    finally:
        os.close(read_only)


def drop_privileges() -> Confinement:
    """Become ``nobody`` with no groups and no capabilities (as root), or clear capabilities (otherwise)."""
    if os.geteuid() == 0:
        uid, gid = _sandbox_ids()
        for capability in range(_capability_count()):
            _prctl(PR_CAPBSET_DROP, capability, f"dropping capability {capability} from the bounding set")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # clears the permitted, effective and ambient sets
        notes, emptied = [], (*CAPABILITY_SETS, "CapBnd")
    else:
        # The bounding set stays (emptying it needs CAP_SETPCAP): it only
        # limits what an exec could gain, which NO_NEW_PRIVS rules out.
        uid, gid = os.getuid(), os.getgid()
        notes, emptied = [f"not started as root: keeps uid {uid} and its supplementary groups"], CAPABILITY_SETS
    _clear_capabilities()  # the inheritable set survives a uid change
    _check_no_capabilities(emptied)
    return Confinement(uid, gid, notes=notes)


def restrict(confinement: Confinement | None = None, *, landlock_layer: bool = True,
             seccomp_layer: bool = True, allowed: dict[str, str] | None = None) -> Confinement:
    """NO_NEW_PRIVS, Landlock (where the kernel has it), then the seccomp allow-list; for good.

    The layers can be left out one at a time only for the tests that show
    what each stops on its own. ``allowed`` is another process's allow-list
    (a virtio device's, virtio_device/syscalls.py) instead of the device model's.
    """
    confinement = confinement or Confinement(os.getuid(), os.getgid())
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    if landlock_layer:
        confinement.landlock_abi = landlock.deny_everything()
        if confinement.landlock_abi == 0:
            confinement.notes.append("no Landlock on this kernel: files are kept out by the uid and seccomp only")
        elif confinement.landlock_abi < landlock.ABI_SCOPED_SIGNALS:
            confinement.notes.append(f"Landlock ABI {confinement.landlock_abi} has no signal scoping: "
                                     f"seccomp alone keeps signals in the process")
    if seccomp_layer:
        allowed = syscall_filter.ALLOWED_SYSCALLS if allowed is None else allowed
        syscall_filter.install(allowed)
        confinement.allowed_syscalls = len(allowed)
    return confinement
