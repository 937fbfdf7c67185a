"""Where a run's vCPUs live and what runs them: the three ``--runner`` choices.

``native`` and ``python`` put every vCPU in one KVM VM of the supervisor and
run each on a thread (thread_runner.py). ``process`` gives each vCPU a
process with a one-vCPU VM of its own over the same guest RAM
(process_runner.py); with no shared interrupt controller it serves only a
guest whose machine needs none. The build picks one class from ``RUNNERS``
and the rest of the run never asks which.

The host also registers the in-kernel routes (in_kernel.py) on its VM(s).
One VM has one coalesced ring, which the device model maps from a vCPU fd.
The process host's VMs are created in the worker processes as they start,
each with a ring of its own: it registers every doorbell's eventfd on each
of them (the eventfds are created before the fork and inherited, so the
device model waits on one eventfd per doorbell whichever VM signals it),
but routes the coalesced ranges to the device model as ordinary writes
(docs/design.md, "In-kernel device routes", says why).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from mpvmm.errors import MpvmmError, UsageError
from mpvmm.supervisor.guest import Guest
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.transport.channel import VcpuChannel
from mpvmm.vcpu_worker.process_runner import ProcessRunner
from mpvmm.vcpu_worker.route_table import Route, RouteTable
from mpvmm.vcpu_worker.runner import VcpuRunner
from mpvmm.vcpu_worker.stats_page import StatsArea
from mpvmm.vcpu_worker.thread_runner import NativeRunner, PythonRunner, ThreadRunner

# Openers of KVM's binary stats fds: the VM's (None where the supervisor has no VM) and each vCPU's.
KvmStatsFds = tuple[Callable[[], int] | None, list[Callable[[], int]]]


class VcpuHost(ABC):
    """The KVM VM(s) of a run's ``cpus`` vCPUs of ``guest``, set up as the guest starts them."""

    # Whether every vCPU sees one in-kernel irqchip (a guest with interrupt lines needs it).
    shares_interrupt_controller: ClassVar[bool]
    # Whether the VM is one machine whose state the supervisor can read and
    # write whole (snapshot, restore, migration); ``machine`` is then that VM.
    has_machine_state: ClassVar[bool]
    machine: VirtualMachine | None = None

    @abstractmethod
    def connect_irq_lines(self, lines: Mapping[str, int]) -> dict[str, int]:
        """An eventfd per interrupt line (device name -> GSI) that raises it when written."""

    @abstractmethod
    def create_runners(self, stats: StatsArea, routes: RouteTable,
                       channels: Sequence[VcpuChannel]) -> list[VcpuRunner]:
        """A runner per vCPU, not yet started."""

    # --- In-kernel routes (in_kernel.py). ---

    def routes(self, table: RouteTable) -> RouteTable:
        """The route table this host's run loops use for the machine's ``table``."""
        return table

    @abstractmethod
    def coalesce(self, route: Route) -> None:
        """Register a coalesced range on the VM(s)."""

    @abstractmethod
    def add_doorbell(self, fd: int, route: Route) -> None:
        """Register eventfd ``fd`` for a doorbell range on the VM(s)."""

    @abstractmethod
    def coalesced_ring(self) -> tuple[int, int] | None:
        """(vCPU fd, page offset) where the device model maps the coalesced ring; None if it has none."""

    @abstractmethod
    def kvm_stats_fds(self) -> KvmStatsFds:
        """KVM's statistics the supervisor can read, for /metrics."""

    @abstractmethod
    def close(self) -> None:
        """Release the VM(s); the runners must have stopped."""

    def __enter__(self) -> "VcpuHost":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ThreadsOnOneVm(VcpuHost):
    """One KVM VM in the supervisor; each vCPU runs on a thread (``runner_class``)."""

    shares_interrupt_controller = True
    has_machine_state = True
    runner_class: ClassVar[type[ThreadRunner]]

    def __init__(self, kvm, memory, guest: Guest, cpus: int):
        self.ring_page = kvm.coalesced_ring_page()
        self.vm = self.machine = VirtualMachine(kvm, memory, range(cpus))
        try:
            guest.set_up_vcpus(kvm, self.vm.vcpus)
        except BaseException:
            self.vm.close()
            raise

    def connect_irq_lines(self, lines: Mapping[str, int]) -> dict[str, int]:
        return self.vm.connect_irq_lines(lines)

    def coalesce(self, route: Route) -> None:
        self.vm.coalesce(route)

    def add_doorbell(self, fd: int, route: Route) -> None:
        self.vm.add_doorbell(fd, route)

    def coalesced_ring(self) -> tuple[int, int] | None:
        return self.vm.vcpus[0].fd, self.ring_page

    def create_runners(self, stats: StatsArea, routes: RouteTable,
                       channels: Sequence[VcpuChannel]) -> list[VcpuRunner]:
        return [self.runner_class(vcpu, stats.address(vcpu.index), routes, channels[vcpu.index])
                for vcpu in self.vm.vcpus]

    def kvm_stats_fds(self) -> KvmStatsFds:
        return self.vm.vm.stats_fd, [vcpu.stats_fd for vcpu in self.vm.vcpus]

    def close(self) -> None:
        self.vm.close()


class NativeThreads(ThreadsOnOneVm):
    """``--runner native``: the C run loop, no GIL held while a vCPU runs."""

    runner_class = NativeRunner


class PythonThreads(ThreadsOnOneVm):
    """``--runner python``: the Python loop, the baseline that shows the GIL."""

    runner_class = PythonRunner


class ProcessPerVcpu(VcpuHost):
    """``--runner process``: a process per vCPU, each building its own VM when started."""

    shares_interrupt_controller = False
    has_machine_state = False  # a VM per worker process, each with its own chips

    def __init__(self, kvm, memory, guest: Guest, cpus: int):
        self.memory = memory
        self.guest = guest
        self.cpus = cpus
        self.doorbells: list[tuple[int, Route]] = []  # registered by each worker on its own VM

    def connect_irq_lines(self, lines: Mapping[str, int]) -> dict[str, int]:
        if lines:
            raise UsageError("--runner process has no shared interrupt controller to raise "
                             f"{', '.join(lines)} on")
        return {}

    def create_runners(self, stats: StatsArea, routes: RouteTable,
                       channels: Sequence[VcpuChannel]) -> list[VcpuRunner]:
        return [ProcessRunner(index, stats.address(index), routes, channels[index], self.memory, self.guest,
                              self.doorbells)
                for index in range(self.cpus)]

    def routes(self, table: RouteTable) -> RouteTable:
        # Each worker's VM would have a coalesced ring of its own, which the
        # device model would have to be sent (SCM_RIGHTS) from each worker
        # after it starts, and poll; these ranges reach it as writes instead.
        return table.without_coalescing()

    def coalesce(self, route: Route) -> None:
        raise MpvmmError("the process runner's VMs have no coalesced ring the device model drains")

    def add_doorbell(self, fd: int, route: Route) -> None:
        self.doorbells.append((fd, route))

    def coalesced_ring(self) -> tuple[int, int] | None:
        return None

    def kvm_stats_fds(self) -> KvmStatsFds:
        return None, []  # each VM is in its own worker process

    def close(self) -> None:
        pass  # each worker process closes its own VM


RUNNERS: dict[str, type[VcpuHost]] = {
    "native": NativeThreads,
    "python": PythonThreads,
    "process": ProcessPerVcpu,
}
