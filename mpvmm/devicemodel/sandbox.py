"""What the device model gives up once it has opened everything it needs.

The device model parses messages shaped by the guest, so it is the process a
hostile guest would attack. After ``configure`` it holds every fd it will
ever use (guest RAM, its queues, the console, the control socket), so it
drops what an attacker would want next:

- ``PR_SET_NO_NEW_PRIVS``: no exec can ever gain privileges (setuid, file caps);
- a seccomp filter (libseccomp through pyseccomp) that fails with EPERM every
  syscall that would start a program, a process or a thread, reach the
  network, trace or write another process, or change the system (mount,
  modules, reboot, keys, BPF). What remains is what a Python process that
  reads queues and writes files needs: memory, files it already has, epoll,
  futexes, clocks, signals to itself. A deny list rather than an allow list,
  because CPython's own needs are not a fixed set; the list below names
  everything this process must never do.
"""

import ctypes
import ctypes.util
import errno

PR_SET_NO_NEW_PRIVS = 38

DENIED_SYSCALLS = (
    # new programs, processes and threads
    "execve", "execveat", "fork", "vfork", "clone", "clone3",
    # the network
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kill", "tkill", "pidfd_open",
    "pidfd_send_signal", "pidfd_getfd",
    # the system
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "reboot", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "iopl", "ioperm", "swapon", "swapoff",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
)


class SandboxError(OSError):
    """The kernel refused to confine the process."""


def confine() -> None:
    """Apply NO_NEW_PRIVS and the seccomp filter to this process, for good."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    import pyseccomp as seccomp  # loads libseccomp.so.2 (Debian's libseccomp2)

    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (OSError, ValueError, RuntimeError):
            pass  # a syscall this architecture or libseccomp does not know
    rules.load()
