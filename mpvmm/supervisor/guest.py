"""The Guest interface: what runs inside the VM, chosen once for a run.

A ``GuestSource`` is what the command line named, checked before anything
is created (bad input is one line and exit 2): the built-in guest's
workload, or a kernel, initrd and command line. Its ``load`` writes the
guest into guest RAM and returns the ``Guest``, which sets up each vCPU as
the guest expects to start, says how to ask it to finish, what it counted,
and when a vCPU's end is the guest's way of ending the run.

Two kinds boot afresh (builtin_guest.py, linux_guest.py). Two more bring a
guest back: a snapshot (snapshot/restore.py) and a VM arriving from another
VMM (migration/destination.py). Their ``load`` fills guest RAM (or maps the
sender's), and their Guest's ``restore`` writes the saved vCPU, VM and
device state into the built VM before it starts; underneath, each wraps
the Guest of the kind it was saved as, which answers everything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from mpvmm.supervisor.ending import GuestEvent
from mpvmm.supervisor.guest_memory import GuestMemory
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
    # How the guest arrived from another VMM (the destination's migration report), if it did.
    arrival: dict | None = None

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

    @abstractmethod
    def describe(self) -> dict:
        """What a restored copy needs to know of this guest: its kind and parameters (msgpack-able)."""

    # --- Bringing a saved guest back, and letting one go. Nothing to do for a guest that boots. ---

    def restore(self, vm, cancelled: Callable[[], bool]) -> None:
        """Bring the built VM (a supervisor.run.RunningVm, not yet started) to the saved state.

        A restored guest writes its vCPUs', VM's and devices' state; an
        arriving one first receives it. ``cancelled()`` turns true when the
        run is told to stop meanwhile.
        """

    def started(self) -> None:
        """The VM's vCPUs run (an arriving guest tells its sender)."""

    def hand_over(self) -> None:
        """Guest RAM now belongs to another VMM: never touch it again, keep the counts as they are."""


class GuestSource(ABC):
    """A guest as the command line named it, checked and ready to load.

    A source that brings its machine along (a snapshot, an arriving VM)
    puts it in the run's configuration (``machine_config``). It is a
    context manager: ``close`` releases what it holds (a mapped file, a
    connection), told the error if the run failed before it started.
    """

    machine: ClassVar[MachineSpec]
    workload: str  # the workload label of mpvmm_vm_info: a workload's name, or "linux"

    @abstractmethod
    def load(self, memory) -> Guest:
        """Write the guest into ``memory`` (supervisor.guest_memory.GuestMemory)."""

    def machine_config(self, config):
        """The run's configuration (supervisor.run.RunConfig) for this guest's machine: as given."""
        return config

    def create_memory(self, size: int):
        """Guest RAM for this guest: new, zeroed shared memory (an arriving VM may bring its own)."""
        return GuestMemory(size)

    def close(self, error: BaseException | None = None) -> None:
        """Release what the source holds; nothing for a guest that boots."""

    def __enter__(self) -> "GuestSource":
        return self

    def __exit__(self, exc_type, error, traceback) -> None:
        self.close(error)
