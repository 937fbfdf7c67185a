"""A virtio device process's seccomp allow-list: what it calls once configured.

Like the device model's (devicemodel/syscall_filter.py, which loads it), it
was recorded with strace from real runs (block reads, writes, flushes and
discards, the console's output and terminal input, entropy, stats and
shutdown) and is checked against such recordings by
tests/virtio_device/test_syscalls.py. Everything it opens (guest RAM, its
backing file or console, its eventfds, its sockets) is open before the
filter is loaded. Each entry says why it is there; any other syscall fails
with EPERM.
"""

ALLOWED_SYSCALLS = {
    # Serving the guest.
    "epoll_wait": "the loop waits on the queues' ioeventfds, the register link, the control socket "
                  "and a console's terminal",
    "epoll_ctl": "a hung-up terminal or a closed register link leaves the poll set",
    "read": "ioeventfd kicks, register accesses from the device model, terminal input",
    "write": "the irqfd, register answers, console output, a traceback on stderr",
    "preadv2": "block reads, straight into guest RAM (os.preadv; glibc's preadv is preadv2)",
    "pwritev2": "block writes, straight from guest RAM (os.pwritev)",
    "fdatasync": "block flushes (and write-through when FLUSH was not negotiated)",
    "fallocate": "block discard and write-zeroes",
    "getrandom": "virtio-rng (os.urandom)",
    # The supervisor.
    "recvfrom": "control messages (socket.recv)",
    "sendto": "control answers: ready, stats, bye (socket.sendall)",
    "getpid": "stats answers carry the pid",
    "close": "shutdown closes its descriptors",
    # Memory: CPython's and glibc's allocators.
    "mmap": "arenas and large buffers (never executable: the device model's argument rule)",
    "munmap": "arenas and large buffers, and guest RAM at shutdown",
    "brk": "glibc's main heap",
    "mremap": "glibc's realloc of a large buffer",
    "madvise": "glibc returning freed memory",
    # The kernel's own plumbing.
    "clock_gettime": "where the vDSO falls back to the syscall",
    "rt_sigreturn": "the return from any signal handler",
    "restart_syscall": "a wait interrupted by SIGSTOP/SIGCONT (or a debugger) resumes",
    "exit_group": "the end",
}
