"""How a vCPU's run ended, as a type the supervisor matches on.

A run loop leaves a raw code and a 64-bit value in the vCPU's stats page
(``LoopCode`` mirrors ``enum outcome`` of outcome.h, checked by
tests/vcpu_worker/test_layout.py). Its runner turns them, with what it can
still read of the vCPU, into one ``VcpuOutcome`` variant: an enum with data,
like crosvm's ``ExitState``, matched exhaustively wherever it is used.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from mpvmm.kvm import bindings as kb


class LoopCode(enum.IntEnum):
    """``enum outcome`` of outcome.h: what the loop wrote, with its value."""

    NONE = 0  # still running, or never ran
    STOPPED = 1
    EXITED = 2  # value: the debug-exit status
    FAULT = 3  # value: the KVM exit reason
    ERROR = 4  # value: errno of the failed syscall


@dataclass(frozen=True)
class Stopped:
    """The supervisor stopped the vCPU: a forced stop, or the end of the run."""


@dataclass(frozen=True)
class Exited:
    """The guest left through the debug-exit port with ``status``."""

    status: int


@dataclass(frozen=True)
class Fault:
    """KVM returned an exit the loop cannot continue from.

    The details are what ``kvm_run`` said about it, where the supervisor
    can read the vCPU's page (not for a worker process's own VM).
    """

    reason: int  # the KVM exit reason
    hardware_reason: int | None = None  # KVM_EXIT_FAIL_ENTRY
    suberror: int | None = None  # KVM_EXIT_INTERNAL_ERROR
    system_event: int | None = None  # KVM_EXIT_SYSTEM_EVENT: its type
    registers: dict[str, int] | None = None


@dataclass(frozen=True)
class RunFailed:
    """KVM_RUN (or a queue call of the loop) failed with ``errno``."""

    errno: int
    registers: dict[str, int] | None = None


@dataclass(frozen=True)
class WorkerFailed:
    """The thread or process running the vCPU failed; ``message`` says how."""

    message: str


VcpuOutcome = Stopped | Exited | Fault | RunFailed | WorkerFailed
FAILURES = (Fault, RunFailed, WorkerFailed)


def from_loop(code: int, value: int, kvm_run: kb.kvm_run | None = None,
              read_registers: Callable[[], dict[str, int] | None] | None = None) -> VcpuOutcome:
    """The outcome a loop reported; ``kvm_run`` and ``read_registers`` add a fault's details."""
    try:
        code = LoopCode(code)
    except ValueError:
        return WorkerFailed(f"the run loop ended with an unknown outcome {code}")
    registers = read_registers() if read_registers is not None and code in (LoopCode.FAULT, LoopCode.ERROR) else None
    match code:
        case LoopCode.STOPPED:
            return Stopped()
        case LoopCode.EXITED:
            return Exited(value)
        case LoopCode.FAULT:
            return _fault(value, kvm_run, registers)
        case LoopCode.ERROR:
            return RunFailed(value, registers)
        case LoopCode.NONE:
            return WorkerFailed("the run loop ended without an outcome")
        case unknown:
            assert_never(unknown)


def _fault(reason: int, kvm_run: kb.kvm_run | None, registers: dict[str, int] | None) -> Fault:
    if kvm_run is None:
        return Fault(reason, registers=registers)
    return Fault(
        reason,
        hardware_reason=kvm_run.fail_entry.hardware_entry_failure_reason if reason == kb.KVM_EXIT_FAIL_ENTRY else None,
        suberror=kvm_run.internal.suberror if reason == kb.KVM_EXIT_INTERNAL_ERROR else None,
        system_event=kvm_run.system_event.type if reason == kb.KVM_EXIT_SYSTEM_EVENT else None,
        registers=registers,
    )


def report_fields(outcome: VcpuOutcome) -> tuple[str, int]:
    """(``outcome``, ``outcome_value``) as the summary and the --report JSON show them."""
    match outcome:
        case Stopped():
            return "stopped", 0
        case Exited(status):
            return "exited", status
        case Fault(reason):
            return f"fault: {kb.exit_reason_name(reason)}", reason
        case RunFailed(errno):
            return "error", errno
        case WorkerFailed():
            return "error", 0
        case _:
            assert_never(outcome)


def describe_failure(index: int, outcome: Fault | RunFailed | WorkerFailed) -> str:
    """What stopped vCPU ``index``, in words, for the status line."""
    match outcome:
        case WorkerFailed(message):
            return f"vcpu {index}: worker failed: {message}"
        case RunFailed(errno):
            return f"vcpu {index} stopped: KVM_RUN failed: {os.strerror(errno)} (errno {errno})"
        case Fault(reason=kb.KVM_EXIT_SHUTDOWN):
            return f"vcpu {index} stopped: triple fault (KVM_EXIT_SHUTDOWN)"
        case Fault(reason=kb.KVM_EXIT_FAIL_ENTRY, hardware_reason=hardware):
            detail = "" if hardware is None else f" (hardware reason {hardware:#x})"
            return f"vcpu {index} stopped: VM entry failed{detail}"
        case Fault(reason=kb.KVM_EXIT_INTERNAL_ERROR, suberror=suberror):
            detail = "" if suberror is None else f" (suberror {suberror})"
            return f"vcpu {index} stopped: KVM internal error{detail}"
        case Fault(reason):
            return f"vcpu {index} stopped: unexpected exit reason {kb.exit_reason_name(reason)} ({reason})"
        case _:
            assert_never(outcome)
