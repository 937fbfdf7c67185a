"""What the device-model process asks of the kernel for itself: descriptors, scheduling, its lifetime.

Each request may be refused (not Linux, a container's limits): the device
model still works without it, so a refusal is not an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterable

import msgpack

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def raise_fd_limit() -> None:
    """Two queue descriptors per vCPU: 512 vCPUs already pass the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass  # configure reports "Too many open files" if it comes to that


def die_with_parent(parent: int) -> bool:
    """Ask the kernel to kill us when the supervisor goes, however it goes.

    False if it went before we asked (we are an orphan already): leave now.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: EOF on the control socket still ends us
    return os.getppid() == parent


def batch_scheduling() -> None:
    """SCHED_BATCH: a posted write wakes us, but must not preempt the vCPU that sent it.

    As an ordinary task the device model, woken by every posted write, often
    preempted the sending vCPU thread on its own CPU (measured: ~0.5 forced
    context switches per exit on the 2-core development VM). A batch task is
    not given wake-up preemption; it runs when the vCPU blocks (every sync
    read does) or at the next tick, draining several writes at once. Measured
    there: pio-device 44.3 -> 37.8 us and uart 48.1 -> 38.6 us per exit.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass  # not Linux, or refused: ordinary scheduling still works


# --- The shape both device processes share (the device model's and each virtio device's). ---


class ServerExit(Exception):
    """Leave a device process's main loop with this exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def run_server(configure: Callable[[], None], loop: Callable[[], None], close: Callable[[], None]) -> int:
    """Configure, serve until a ServerExit, close whatever happened; the exit status."""
    try:
        configure()
        loop()
    except ServerExit as done:
        return done.status
    finally:
        close()
    return 0


def close_all(closers: Iterable[Callable[[], None]], errors: tuple[type[BaseException], ...]) -> None:
    """Call every closer: one that fails with ``errors`` must not leave the rest open or change the exit status."""
    for close in closers:
        with contextlib.suppress(*errors):
            close()


def control_socket(fd_text: str, who: str) -> socket.socket | None:
    """The supervisor's control socket at fd ``fd_text``, blocking; None, said on stderr, if it is not one."""
    try:
        control = socket.socket(fileno=int(fd_text))
    except OSError as err:
        print(f"{who}: control fd {fd_text} is not a socket: {err}", file=sys.stderr)
        return None
    control.setblocking(True)
    return control


def read_control(control: socket.socket, unpacker: msgpack.Unpacker, size: int) -> bool:
    """Feed what the supervisor sent into ``unpacker``; False if it overflows the buffer.

    ServerExit(0) when the supervisor is gone (end of file or an error): leave quietly.
    """
    try:
        data = control.recv(size)
    except OSError as err:
        raise ServerExit(0) from err
    if not data:
        raise ServerExit(0)
    try:
        unpacker.feed(data)
    except msgpack.BufferFull:
        return False
    return True
