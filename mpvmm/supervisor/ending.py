"""How a run ends, as a type, and the status line and exit code it makes.

The supervisor's wait loop returns one ``RunEnding``; ``exit_status`` turns
it and every vCPU's ``VcpuOutcome`` into the exit code and status line the
user sees. Both are enums with data, matched exhaustively, like
Firecracker's ``FcExitCode``.

Exit codes: 0 for a clean run (and a guest that powered off or rebooted);
the guest's debug-exit status where it set one; 1 for a VM failure (a vCPU
fault, the device model dying, a guest triple fault or crash event);
128+N when stopped by signal N.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, assert_never

from mpvmm.devicemodel.acpi_pm import EVENT_POWEROFF, EVENT_REBOOT
from mpvmm.vcpu_worker.outcome import Exited, Fault, RunFailed, Stopped, VcpuOutcome, WorkerFailed, describe_failure


class GuestEvent(enum.Enum):
    """A guest ending the machine by itself: its status line and exit code."""

    POWER_OFF = ("guest powered off", 0)
    REBOOT = ("guest rebooted", 0)  # a Linux guest's reboot=k, panic=-1 ... end this way
    TRIPLE_FAULT = ("guest reset by a triple fault", 1)
    CRASH = ("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)", 1)

    def __init__(self, status: str, exit_code: int):
        self.status = status
        self.exit_code = exit_code


# The device model's system_event names (devicemodel/acpi_pm.py, pc.py).
DEVICE_MODEL_EVENTS = {EVENT_POWEROFF: GuestEvent.POWER_OFF, EVENT_REBOOT: GuestEvent.REBOOT}


@dataclass(frozen=True)
class GuestEnded:
    """The guest ended the machine: told by the device model, or by vCPU ``vcpu``'s exit."""

    event: GuestEvent
    vcpu: int | None = None


@dataclass(frozen=True)
class UnknownGuestEvent:
    """The device model sent a system event this supervisor does not know."""

    name: str


@dataclass(frozen=True)
class DeviceModelDied:
    how: str  # "killed by signal 9", "exit status 1"


@dataclass(frozen=True)
class VirtioDeviceDied:
    """A virtio device's process ended while the VM ran: the VM cannot go on without it."""

    name: str  # "disk0", "console", "rng"
    how: str


@dataclass(frozen=True)
class VcpuFailed:
    """A vCPU faulted, KVM_RUN failed, or its runner failed (its outcome says which)."""


@dataclass(frozen=True)
class GuestExited:
    """Every vCPU left by itself (the built-in guest's debug-exit port)."""


@dataclass(frozen=True)
class StopSignal:
    signum: int


@dataclass(frozen=True)
class TimeLimit:
    """--seconds ran out."""


@dataclass(frozen=True)
class ApiStop:
    """The control API's stop: ended like --seconds."""


@dataclass(frozen=True)
class MigratedAway:
    """The VM runs in another VMM now; ``report`` says how it went there."""

    to: str
    report: dict


RunEnding = (GuestEnded | UnknownGuestEvent | DeviceModelDied | VirtioDeviceDied | VcpuFailed | GuestExited | StopSignal | TimeLimit
             | ApiStop | MigratedAway)


def device_model_ending(name: str) -> GuestEnded | UnknownGuestEvent:
    """The ending a system event of the device model stands for."""
    event = DEVICE_MODEL_EVENTS.get(name)
    return GuestEnded(event) if event is not None else UnknownGuestEvent(name)


def status_line(ending: RunEnding) -> str:
    match ending:
        case GuestEnded(event, None):
            return event.status
        case GuestEnded(event, vcpu):
            return f"{event.status} (vcpu {vcpu})"
        case UnknownGuestEvent(name):
            return f"guest event {name}"
        case DeviceModelDied(how):
            return f"device model died ({how})"
        case VirtioDeviceDied(name, how):
            return f"virtio device {name} died ({how})"
        case VcpuFailed():
            return "vcpu fault"
        case GuestExited():
            return "guest exited"
        case StopSignal(signum):
            return f"stopped by {signal.Signals(signum).name}"
        case TimeLimit():
            return "time limit reached"
        case ApiStop():
            return "stopped through the API"
        case MigratedAway(to, report):
            return (f"migrated to {to} (downtime {report['downtime_ms']:.1f} ms, "
                    f"total {report['total_seconds']:.2f} s, {report['rounds']} rounds)")
        case _:
            assert_never(ending)


class ExitStatus(NamedTuple):
    code: int
    status: str
    fault_registers: dict[int, dict[str, int]]  # vCPU index -> its registers, for a fault


def exit_status(ending: RunEnding, outcomes: Sequence[VcpuOutcome]) -> ExitStatus:
    """The exit code and status line of a run, and the failed vCPU's registers where known.

    A guest that ended the machine decides alone; otherwise the first vCPU
    that failed names the failure, then the device model's death or a stop
    signal, then the first non-zero debug-exit status.
    """
    status = status_line(ending)
    match ending:
        case GuestEnded(event):
            return ExitStatus(event.exit_code, status, {})
        case DeviceModelDied() | VirtioDeviceDied():
            unless_a_vcpu_failed = ExitStatus(1, status, {})
        case StopSignal(signum):
            # The shell's convention for "ended by a signal".
            unless_a_vcpu_failed = ExitStatus(128 + signum, status, {})
        case MigratedAway():
            return ExitStatus(0, status, {})  # its vCPUs were stopped here, and run on there
        case UnknownGuestEvent() | VcpuFailed() | GuestExited() | TimeLimit() | ApiStop():
            unless_a_vcpu_failed = None
        case _:
            assert_never(ending)
    for index, outcome in enumerate(outcomes):
        match outcome:
            case Fault(registers=registers) | RunFailed(registers=registers):
                return ExitStatus(1, describe_failure(index, outcome), {index: registers} if registers else {})
            case WorkerFailed():
                return ExitStatus(1, describe_failure(index, outcome), {})
            case Stopped() | Exited():
                pass
            case _:
                assert_never(outcome)
    if unless_a_vcpu_failed is not None:
        return unless_a_vcpu_failed
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exited) and outcome.status:
            return ExitStatus(outcome.status & 0xFF, f"{status}; vcpu {index} exited with status {outcome.status}", {})
    return ExitStatus(0, status, {})
