"""The Guest interface: what runs inside the VM, chosen once for a run.

A ``GuestSource`` is what the command line named, checked before anything
is created (bad input is one line and exit 2): the built-in guest's
workload, or a kernel, initrd and command line. Its ``load`` writes the
guest into guest RAM and returns the ``Guest``, which sets up each vCPU as
the guest expects to start, says how to ask it to finish, what it counted,
and when a vCPU's end is the guest's way of ending the run.

Two kinds exist (builtin_guest.py, linux_guest.py). A guest restored from a
snapshot is a third source: its ``load`` restores guest RAM and its Guest's
``set_up_vcpus`` the saved vCPU state, and the rest of the run is the same.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from mpvmm.supervisor.ending import GuestEvent
from mpvmm.vcpu_worker.outcome import VcpuOutcome


@dataclass(frozen=True)
class MachineSpec:
    """What the device model emulates for a guest, and how it reaches the guest."""

    name: str  # the device set: "builtin" or "pc" (devicemodel/config.py)
    irq_lines: Mapping[str, int]  # device name -> GSI, each raised through an irqfd
    host_input: bool  # the terminal on stdin, if there is one, feeds the UART


@dataclass
class GuestCounts:
    """What one vCPU of the built-in guest says it did."""

    state: int
    status: int
    ops: dict[str, int]
    pio_write_sum: int
    mmio_write_sum: int


class Guest(ABC):
    """A guest loaded into guest RAM."""

    # How long the guest gets to finish by itself once asked, before its vCPUs are forced off.
    stop_grace_seconds: ClassVar[float]

    @abstractmethod
    def set_up_vcpus(self, kvm, vcpus: Sequence) -> None:
        """Give each vCPU (kvm.vcpu.Vcpu, its index the guest's) the state the guest starts in.

        The one place the guest's CPUID is set. ``vcpus`` is every vCPU of a
        VM, or the single one a worker process's VM has.
        """

    @abstractmethod
    def request_stop(self) -> None:
        """Ask the guest to finish by itself (it may have no way to be asked)."""

    @abstractmethod
    def counts(self, index: int) -> GuestCounts | None:
        """What vCPU ``index`` says it did; None for a guest that keeps no counts for us."""

    @abstractmethod
    def atomic_total(self) -> int | None:
        """The total of the counters the atomics workload shares; None where there are none."""

    @abstractmethod
    def ending(self, outcome: VcpuOutcome) -> GuestEvent | None:
        """The guest event a vCPU's outcome stands for (a reset, a power-off), if any."""


class GuestSource(ABC):
    """A guest as the command line named it, checked and ready to load."""

    machine: ClassVar[MachineSpec]
    workload: str  # the workload label of mpvmm_vm_info: a workload's name, or "linux"

    @abstractmethod
    def load(self, memory) -> Guest:
        """Write the guest into ``memory`` (supervisor.guest_memory.GuestMemory)."""
