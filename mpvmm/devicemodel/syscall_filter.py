"""The device model's seccomp filter: an allow-list of what it calls once configured.

Everything the device model needs to open (guest RAM, its queues or its
ring area, KVM's coalesced ring page, the console, the control socket,
irqfds, doorbell eventfds, the terminal) is open before the
filter is loaded; from then on it only waits, reads, writes and allocates.
The list was recorded with strace from real runs (the built-in guest's
workloads, the Linux machine with terminal input, irqfds and the RTC's
timer interrupts, a Linux boot, metrics scrapes, shutdown) and is checked
against such recordings by tests/devicemodel/test_syscalls.py, so it cannot
rot silently. Each entry says why it is there. Any other syscall fails with
EPERM, which Python turns into an OSError naming it; a syscall of another
ABI (32-bit ``int 0x80``, x32) kills the process, as a filter for one
architecture cannot judge it.
"""

from __future__ import annotations

import errno
import mmap

import pyseccomp as seccomp  # ctypes over Debian's libseccomp2

FUTEX_WAKE, FUTEX_PRIVATE_FLAG = 1, 128  # linux/futex.h

# name -> why the device model calls it after it is sandboxed.
ALLOWED_SYSCALLS = {
    # Serving the vCPUs.
    "epoll_wait": "the main loop waits on its queues, the control socket and the terminal, "
                  "until the next device timer (the RTC's update cycle)",
    "epoll_ctl": "terminal input leaves the poll set when the terminal hangs up or fails",
    "mq_timedreceive": "requests (posix_ipc, non-blocking)",
    "mq_timedsend": "replies (posix_ipc, non-blocking)",
    "futex": "ring transport: wake a vCPU asleep for its reply or for room in its request ring "
             "(FUTEX_WAKE only: an argument check)",
    "sched_yield": "ring transport: polling gives the core to anyone who wants it between looks",
    # The supervisor.
    "recvfrom": "control messages (socket.recv)",
    "sendto": "control answers: ready, stats, bye, system events (socket.sendall)",
    "getpid": "stats answers carry the pid",
    # Descriptors it already holds.
    "read": "terminal input for the UART; the counters of the ring transport's and the doorbells' eventfds",
    "write": "console output, interrupts (a write to an irqfd), a traceback on stderr",
    "close": "shutdown closes the queues, epoll, the console and the socket",
    # Memory: CPython's and glibc's allocators.
    "mmap": "arenas and large buffers (never executable: see below)",
    "munmap": "arenas and large buffers, and guest RAM at shutdown",
    "brk": "glibc's main heap",
    "mremap": "glibc's realloc of a large buffer",
    "madvise": "glibc returning freed memory",
    # The kernel's own plumbing.
    "clock_gettime": "the RTC's host time, its timer deadline and the loop's wait timeout "
                     "where the vDSO falls back to the syscall",
    "rt_sigreturn": "the return from any signal handler",
    "restart_syscall": "a wait interrupted by SIGSTOP/SIGCONT (or a debugger) resumes",
    "exit_group": "the end",
}
# Calls allowed only with these argument checks: (syscall, argument index, mask, required value).
ARGUMENT_RULES = (
    # No executable memory: a device model never loads or generates code.
    ("mmap", 2, mmap.PROT_EXEC, 0),
    # Wakes only (shared or private): it never waits on a futex, and no other operation is needed.
    ("futex", 1, ~FUTEX_PRIVATE_FLAG & 0xFFFFFFFF, FUTEX_WAKE),
)


def build_filter() -> seccomp.SyscallFilter:
    """The filter, not loaded: ALLOWED_SYSCALLS pass, anything else is EPERM."""
    rules = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    checked = {name for name, *_ in ARGUMENT_RULES}
    for name in ALLOWED_SYSCALLS:
        if name not in checked:
            rules.add_rule(seccomp.ALLOW, name)
    for name, index, mask, value in ARGUMENT_RULES:
        rules.add_rule(seccomp.ALLOW, name, seccomp.Arg(index, seccomp.MASKED_EQ, mask, value))
    return rules


def install() -> None:
    """Load the filter into this process, for good (needs PR_SET_NO_NEW_PRIVS first)."""
    build_filter().load()
