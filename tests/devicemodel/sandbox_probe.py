"""A device model that attacks its host instead of serving: ``python -m tests.devicemodel.sandbox_probe``.

It runs the real device model's ``configure`` (guest RAM, queues, console,
privileges dropped, sandbox applied, exactly as ``python -m mpvmm.devicemodel``
does), then, instead of serving the guest, tries what a device model taken
over by a hostile guest would try next, and reports on the control socket
what each attempt returned: ``"ok"`` or the errno's name.

    python -m tests.devicemodel.sandbox_probe <control_fd> <json targets>

``targets`` names the victims: ``victim`` (a pid), ``root_file`` (a file
to overwrite), ``open_dir`` (a world-writable folder to create a file in),
``read_file`` (a file to read), ``start_as`` (a uid to become before
``configure``, as an unprivileged user's device model would start) and ``layers``: ``"all"`` (the real
sandbox), ``"none"`` (no sandbox: the attempts that then succeed show the
test can fail) or one layer alone (``"privileges"``, ``"landlock"``,
``"seccomp"``).

Every library call an attempt needs is looked up before ``configure``: after
it, the process cannot open a library, and only syscalls on the allow-list work.
"""

import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import sys

from mpvmm.devicemodel import process, sandbox

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

# x86-64 syscall numbers (asm/unistd_64.h).
SYS_TGKILL = 234
SYS_PRLIMIT64 = 302
SYS_IO_URING_SETUP = 425
SYS_PTRACE = 101
SYS_PROCESS_VM_WRITEV = 311
SYS_MEMFD_CREATE = 319
SYS_PIDFD_OPEN = 434
SYS_UNSHARE = 272
SYS_SETUID = 105
PTRACE_ATTACH = 16
CLONE_NEWUSER = 0x10000000
RLIMIT_NOFILE = 7
IO_URING_PARAMS_SIZE = 120
MQUEUE_MSG_MAX = "/proc/sys/fs/mqueue/msg_max"
MAP_FAILED = ctypes.c_void_p(-1).value


class _Rlimit(ctypes.Structure):
    _fields_ = [("rlim_cur", ctypes.c_uint64), ("rlim_max", ctypes.c_uint64)]


def _raw(result: int) -> str:
    """A libc or raw syscall's result: "ok", or the errno's name."""
    if result == -1 or result == MAP_FAILED:
        return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return "ok"


def _python(attempt) -> str:
    """A Python call's result: "ok", or the errno's name of the OSError it raised."""
    try:
        attempt()
        return "ok"
    except OSError as err:
        return errno.errorcode.get(err.errno, str(err.errno))


def _write_file(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_TRUNC) -> None:
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)


def _io_uring_setup() -> int:
    params = ctypes.create_string_buffer(IO_URING_PARAMS_SIZE)
    fd = libc.syscall(SYS_IO_URING_SETUP, 1, params)
    if fd >= 0:
        os.close(fd)
    return fd


def attempts(probe: process.DeviceModelServer, targets: dict, ram: int) -> dict[str, str]:
    victim = targets["victim"]
    old_limit = _Rlimit()
    new_limit = _Rlimit(1, 1)
    ram_size = len(probe.ram)
    msg_max = targets["msg_max"].encode()
    return {
        # The six.
        "tgkill another process": _raw(libc.syscall(SYS_TGKILL, victim, victim, signal.SIGSTOP)),
        "prlimit64 another process": _raw(libc.syscall(SYS_PRLIMIT64, victim, RLIMIT_NOFILE,
                                                       ctypes.byref(new_limit), ctypes.byref(old_limit))),
        "write a root-owned file": _python(lambda: _write_file(targets["root_file"], b"owned\n")),
        "write a sysctl": _python(lambda: _write_file(MQUEUE_MSG_MAX, msg_max)),
        "open /proc/<other>/mem read-write": _python(lambda: os.close(os.open(f"/proc/{victim}/mem", os.O_RDWR))),
        "io_uring_setup": _raw(_io_uring_setup()),
        # And what would come next.
        "create a file in a world-writable folder": _python(
            lambda: _write_file(os.path.join(targets["open_dir"], "planted"), b"x", os.O_WRONLY | os.O_CREAT)),
        "read a file": _python(lambda: _read_file(targets["read_file"])),
        "signal the parent": _python(lambda: os.kill(os.getppid(), 0)),
        "ptrace another process": _raw(libc.syscall(SYS_PTRACE, PTRACE_ATTACH, victim, 0, 0)),
        "process_vm_writev another process": _raw(libc.syscall(SYS_PROCESS_VM_WRITEV, victim, 0, 0, 0, 0, 0)),
        "pidfd_open another process": _raw(libc.syscall(SYS_PIDFD_OPEN, victim, 0)),
        # A path that does not exist: unconfined, this is ENOENT rather than a new program.
        "execve": _python(lambda: os.execv("/nonexistent-mpvmm-probe", ["x"])),
        "fork": _python(lambda: os._exit(0) if os.fork() == 0 else None),
        "socket": _python(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "memfd_create": _raw(libc.syscall(SYS_MEMFD_CREATE, b"x", 0)),
        "setuid 0": _raw(libc.syscall(SYS_SETUID, 0)),
        "map memory executable": _raw(libc.mmap(None, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC,
                                                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)),
        "make guest RAM writable": _raw(libc.mprotect(ram, ram_size, mmap.PROT_READ | mmap.PROT_WRITE)),
        # Last: unconfined, it moves the probe into a namespace where the attempts above mean less.
        "unshare a user namespace": _raw(libc.syscall(SYS_UNSHARE, CLONE_NEWUSER)),
    }


def unconfine(layers: str) -> None:
    """Replace the device model's sandbox by nothing, or by one of its layers alone."""
    if layers == "all":
        return
    if layers != "privileges":
        process.drop_privileges = lambda: sandbox.Confinement(os.getuid(), os.getgid())
    process.restrict = {
        "landlock": lambda confinement: sandbox.restrict(confinement, seccomp_layer=False),
        "seccomp": lambda confinement: sandbox.restrict(confinement, landlock_layer=False),
    }.get(layers, lambda confinement: confinement)


def main(argv: list[str]) -> int:
    targets = json.loads(argv[1])
    with open(MQUEUE_MSG_MAX) as f:
        targets["msg_max"] = f.read()
    unconfine(targets["layers"])
    if targets.get("start_as") is not None:
        # As if started by an unprivileged user (everything is imported already).
        os.setgroups([])
        os.setresgid(targets["start_as"], targets["start_as"], targets["start_as"])
        os.setresuid(targets["start_as"], targets["start_as"], targets["start_as"])
    probe = process.DeviceModelServer(socket.socket(fileno=int(argv[0])), os.getppid())
    try:
        probe.configure()  # answers ready
        # The test reads our /proc files now (we can no longer) and says where guest RAM is.
        go = probe._next_control_message()
        probe._send({"op": "probe", "results": attempts(probe, targets, go["ram_address"])})
    except process._Exit as done:
        return done.status
    finally:
        probe.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
