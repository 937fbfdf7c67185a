"""The built-in guest in a VM: loading it, its parameter block, its vCPUs and its reports.

Every vCPU enters the guest directly in 64-bit mode at CPL 3 (x86/usermode.py):
guest supervisor-mode code is emulated instruction by instruction on the
machines this is developed on (docs/design.md, "PVM hosts"), so the guest
has none.
"""

import ctypes
from collections.abc import Sequence

from mpvmm.devicemodel.devices import TESTDEV_DOORBELL_VALUE
from mpvmm.errors import GuestLoadError, UsageError
from mpvmm.guest import abi
from mpvmm.supervisor.ending import GuestEvent
from mpvmm.supervisor.guest import Guest, GuestCounts, GuestSource, MachineSpec
from mpvmm.vcpu_worker.outcome import VcpuOutcome
from mpvmm.x86 import layout
from mpvmm.x86.cpuid import vcpu_cpuid
from mpvmm.x86.loader import load_elf
from mpvmm.x86.usermode import enter_user_mode, write_boot_structures

DEMO_SLEEP_US = 2000  # the demo workload rests 2 ms per round: a gentle, steady rate
# Report slots between the reports' address and the shared counters (layout.py).
MAX_CPUS = (layout.GUEST_SHARED_ADDR - layout.GUEST_REPORTS_ADDR) // layout.GUEST_REPORT_STRIDE


def stack_top(index: int) -> int:
    return layout.GUEST_STACKS_ADDR + (index + 1) * layout.GUEST_STACK_SIZE


def min_memory(cpus: int) -> int:
    """The least RAM that holds the guest's code, tables and every vCPU's stack."""
    return stack_top(cpus - 1)


def workload_id(name: str) -> int:
    try:
        return abi.WORKLOADS.index(name)
    except ValueError:
        raise UsageError(f"unknown workload {name!r} (choose from {', '.join(abi.WORKLOADS)})") from None


class BuiltinGuestSource(GuestSource):
    """The built-in guest running ``workload`` on ``cpus`` vCPUs in ``memory_size`` bytes."""

    machine = MachineSpec("builtin", {}, host_input=False)

    def __init__(self, cpus: int, workload: str, memory_size: int):
        workload_id(workload)
        if cpus > MAX_CPUS:
            raise UsageError(f"the built-in guest supports at most {MAX_CPUS} vCPUs")
        needed = min_memory(cpus)
        if memory_size < needed:
            raise UsageError(
                f"--memory {memory_size >> 20} MiB is too small for the guest with {cpus} vCPUs "
                f"(needs at least {-(-needed >> 20)} MiB)"
            )
        self.cpus = cpus
        self.workload = workload

    def load(self, memory) -> "BuiltinGuest":
        return BuiltinGuest(memory, self.cpus, self.workload)


class BuiltinGuest(Guest):
    """The built-in guest loaded into ``memory`` for ``cpus`` vCPUs."""

    stop_grace_seconds = 3.0  # enough to finish a round, report and leave

    def __init__(self, memory, cpus: int, workload: str):
        self.cpus = cpus
        path = abi.builtin_guest_path()
        try:
            image = path.read_bytes()
        except OSError as err:
            raise GuestLoadError(f"built-in guest missing at {path}: reinstall mpvmm ({err.strerror})") from err
        loaded = load_elf(memory, image, "built-in guest")
        if loaded.high > layout.GUEST_CODE_ADDR + layout.GUEST_CODE_MAX:
            raise GuestLoadError("built-in guest is larger than its slot in the layout")
        self.entry = loaded.entry
        write_boot_structures(memory)
        self.params = memory.view(layout.GUEST_PARAMS_ADDR, abi.GuestParams)
        ctypes.memset(ctypes.addressof(self.params), 0, ctypes.sizeof(abi.GuestParams))
        self.params.magic = abi.PARAMS_MAGIC
        self.params.abi_version = abi.ABI_VERSION
        self.params.cpus = cpus
        self.params.workload = workload_id(workload)
        self.params.demo_sleep_us = DEMO_SLEEP_US
        self.params.reports_addr = layout.GUEST_REPORTS_ADDR
        self.params.report_stride = layout.GUEST_REPORT_STRIDE
        self.params.shared_addr = layout.GUEST_SHARED_ADDR
        self.params.mmio_testdev_addr = layout.MMIO_TESTDEV_ADDR
        self.params.uart_port = layout.COM1_PORT
        self.params.null_port = layout.NULL_PORT
        self.params.debug_exit_port = layout.DEBUG_EXIT_PORT
        self.params.sleep_port = layout.SLEEP_PORT
        self.params.pio_testdev_port = layout.PIO_TESTDEV_PORT
        self.params.pio_doorbell_port = layout.PIO_TESTDEV_DOORBELL_PORT
        self.params.mmio_doorbell_addr = layout.MMIO_TESTDEV_DOORBELL_ADDR
        self.params.doorbell_value = TESTDEV_DOORBELL_VALUE
        self._reports = [
            memory.view(layout.GUEST_REPORTS_ADDR + i * layout.GUEST_REPORT_STRIDE, abi.GuestReport)
            for i in range(cpus)
        ]
        self._shared = memory.view(layout.GUEST_SHARED_ADDR, abi.GuestShared)

    def set_up_vcpus(self, kvm, vcpus: Sequence) -> None:
        """Each vCPU's own CPUID, then straight into the guest at CPL 3, runnable at once.

        Application processors are made runnable directly (no INIT/SIPI):
        the guest has no ring-0 code to bring them up itself.
        """
        supported = kvm.supported_cpuid()
        for vcpu in vcpus:
            vcpu.set_cpuid2(vcpu_cpuid(supported, vcpu.index, self.cpus))
            enter_user_mode(vcpu, self.entry, stack_top(vcpu.index), vcpu.index, layout.GUEST_PARAMS_ADDR)

    def request_stop(self) -> None:
        """Ask every vCPU to finish its workload, report and exit."""
        self.params.stop = 1

    def counts(self, index: int) -> GuestCounts:
        report = self._reports[index]
        return GuestCounts(
            state=report.state if report.magic == abi.REPORT_MAGIC else 0,
            status=report.status,
            ops=report.op_counts(),
            pio_write_sum=report.pio_write_sum,
            mmio_write_sum=report.mmio_write_sum,
        )

    def atomic_total(self) -> int:
        """The sum of the shared counters the atomics workload increments."""
        return sum(self._shared.counters)

    def ending(self, outcome: VcpuOutcome) -> GuestEvent | None:
        return None  # a vCPU of the built-in guest that stops by a fault is a fault
