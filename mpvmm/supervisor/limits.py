"""Host limits a VM must fit, checked before anything is created.

Each check raises HostLimitError naming the limit and how to raise it.
"""

import os
import resource

from mpvmm.arguments import format_size
from mpvmm.errors import HostLimitError

MQUEUE_SYSCTL = "/proc/sys/fs/mqueue"
QUEUE_MESSAGE_SIZE = 128  # docs/protocol.md
PREFERRED_QUEUE_DEPTH = 10
# Per-message kernel overhead counted against RLIMIT_MSGQUEUE (ipc/mqueue.c:
# a msg_msg pointer plus a posix_msg_tree_node per message, rounded up).
_MQUEUE_MESSAGE_OVERHEAD = 64
# File descriptors per vCPU (vCPU fd, two queues, stats fd) and for the rest
# of the supervisor (KVM, VM, memory, device-model control, Python itself).
_FDS_PER_VCPU = 4
_FDS_BASE = 64


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def queue_depth() -> int:
    """Messages per queue: 10, or less where msg_max is lower (docs/design.md, "Message-queue limits")."""
    msg_max = _read_int(f"{MQUEUE_SYSCTL}/msg_max") or PREFERRED_QUEUE_DEPTH
    return min(PREFERRED_QUEUE_DEPTH, msg_max)


def check_queues(cpus: int) -> None:
    """Two queues per vCPU must fit queues_max and the user's RLIMIT_MSGQUEUE."""
    queues = 2 * cpus
    queues_max = _read_int(f"{MQUEUE_SYSCTL}/queues_max")
    if queues_max is not None and queues > queues_max:
        raise HostLimitError(
            f"{cpus} vCPUs need {queues} message queues but fs.mqueue.queues_max is {queues_max}: "
            f"raise it with `sysctl fs.mqueue.queues_max={queues}`"
        )
    msgsize_max = _read_int(f"{MQUEUE_SYSCTL}/msgsize_max")
    if msgsize_max is not None and msgsize_max < QUEUE_MESSAGE_SIZE:
        raise HostLimitError(
            f"fs.mqueue.msgsize_max is {msgsize_max}, below the {QUEUE_MESSAGE_SIZE} bytes a message needs"
        )
    needed = queues * queue_depth() * (QUEUE_MESSAGE_SIZE + _MQUEUE_MESSAGE_OVERHEAD)
    _ensure_soft_limit(resource.RLIMIT_MSGQUEUE, needed,
                       f"{cpus} vCPUs need about {needed} bytes of message queues",
                       "RLIMIT_MSGQUEUE", "`ulimit -q`, or LimitMSGQUEUE= for a service")


def _ensure_soft_limit(limit: int, needed: int, what: str, name: str, how: str) -> None:
    """Raise the soft limit to ``needed`` where the hard limit allows; else say how."""
    soft, hard = resource.getrlimit(limit)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise HostLimitError(f"{what} but {name} is {hard}: raise it ({how})")
    resource.setrlimit(limit, (needed, hard))


def check_open_files(cpus: int) -> None:
    needed = _FDS_BASE + _FDS_PER_VCPU * cpus
    _ensure_soft_limit(resource.RLIMIT_NOFILE, needed, f"{cpus} vCPUs need about {needed} open files",
                       "RLIMIT_NOFILE", "`ulimit -n`")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_memory(size: int) -> None:
    """Guest RAM must fit in the host's free memory and in /dev/shm."""
    available = _mem_available()
    if available is not None and size > available:
        raise HostLimitError(
            f"guest memory of {format_size(size)} exceeds the host's available memory "
            f"({format_size(available)}): choose a smaller --memory"
        )
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return
    free = shm.f_bavail * shm.f_frsize
    if size > free:
        raise HostLimitError(
            f"guest memory of {format_size(size)} does not fit /dev/shm ({format_size(free)} free): "
            f"choose a smaller --memory or remount /dev/shm with a larger size="
        )


def check_host(cpus: int, memory_size: int, *, message_queues: bool = True) -> None:
    """Everything a VM of ``cpus`` vCPUs needs; the queue limits only for the message-queue transport."""
    check_memory(memory_size)
    if message_queues:
        check_queues(cpus)
    check_open_files(cpus)
