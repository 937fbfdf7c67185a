"""The built-in guest in a VM: loading it, its parameter block, its vCPUs and its reports.

Every vCPU enters the guest directly in 64-bit mode at CPL 3 (x86/usermode.py):
guest supervisor-mode code is emulated instruction by instruction on the
machines this is developed on (docs/design.md, "PVM hosts"), so the guest
has none.
"""

import ctypes
from collections.abc import Sequence

from mpvmm.arguments import format_size
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
DEFAULT_DIRTY_RATE_MIB = 16  # the dirty workload's MiB/s when --dirty-rate is not given
DIRTY_ROUND_US = 2000  # the dirty workload's bursts: often enough to be a steady rate
MAX_DIRTY_RATE_MIB = 1 << 20  # 1 TiB/s: beyond any host, and small enough for the guest's arithmetic
# Report slots between the reports' address and the shared counters (layout.py).
MAX_CPUS = (layout.GUEST_SHARED_ADDR - layout.GUEST_REPORTS_ADDR) // layout.GUEST_REPORT_STRIDE


def stack_top(index: int) -> int:
    return layout.GUEST_STACKS_ADDR + (index + 1) * layout.GUEST_STACK_SIZE


def min_memory(cpus: int) -> int:
    """The least RAM that holds the guest's code, tables and every vCPU's stack."""
    return stack_top(cpus - 1)


def dirty_region(cpus: int, memory_size: int) -> tuple[int, int]:
    """(base, size) of the RAM the dirty workload writes: from above the stacks to the end of low RAM."""
    base = -(-min_memory(cpus) // (2 * layout.MIB)) * (2 * layout.MIB)
    end = min(memory_size, layout.MMIO_HOLE_START)
    return base, max(0, end - base)


def workload_id(name: str) -> int:
    try:
        return abi.WORKLOADS.index(name)
    except ValueError:
        raise UsageError(f"unknown workload {name!r} (choose from {', '.join(abi.WORKLOADS)})") from None


class BuiltinGuestSource(GuestSource):
    """The built-in guest running ``workload`` on ``cpus`` vCPUs in ``memory_size`` bytes."""

    machine = MachineSpec("builtin", {}, host_input=False)

    def __init__(self, cpus: int, workload: str, memory_size: int, dirty_rate_mib: int | None = None):
        workload_id(workload)
        if dirty_rate_mib is not None and workload != "dirty":
            raise UsageError("--dirty-rate is for --workload dirty")
        if dirty_rate_mib is not None and not 0 <= dirty_rate_mib <= MAX_DIRTY_RATE_MIB:
            raise UsageError(f"--dirty-rate must be between 0 and {MAX_DIRTY_RATE_MIB} MiB/s, not {dirty_rate_mib}")
        if cpus > MAX_CPUS:
            raise UsageError(f"the built-in guest supports at most {MAX_CPUS} vCPUs")
        needed = min_memory(cpus)
        if memory_size < needed:
            raise UsageError(
                f"--memory {format_size(memory_size)} is too small for the guest with {cpus} vCPU{'s' if cpus > 1 else ''} "
                f"(needs at least {format_size(needed)})"
            )
        self.cpus = cpus
        self.workload = workload
        self.dirty_rate_mib = DEFAULT_DIRTY_RATE_MIB if dirty_rate_mib is None else dirty_rate_mib

    def load(self, memory) -> "BuiltinGuest":
        return BuiltinGuest.load(memory, self.cpus, self.workload, self.dirty_rate_mib)


class BuiltinGuest(Guest):
    """The built-in guest in ``memory`` for ``cpus`` vCPUs: its parameter block, reports and counters.

    ``load`` writes it into guest RAM; a guest restored from a snapshot or
    arriving from another VMM is already there, and is only looked at.
    """

    stop_grace_seconds = 3.0  # enough to finish a round, report and leave

    def __init__(self, memory, cpus: int, entry: int):
        self.cpus = cpus
        self.entry = entry
        self.params = memory.view(layout.GUEST_PARAMS_ADDR, abi.GuestParams)
        self._reports = [
            memory.view(layout.GUEST_REPORTS_ADDR + i * layout.GUEST_REPORT_STRIDE, abi.GuestReport)
            for i in range(cpus)
        ]
        self._shared = memory.view(layout.GUEST_SHARED_ADDR, abi.GuestShared)
        self._handed_over: tuple[list[GuestCounts], int] | None = None

    @classmethod
    def load(cls, memory, cpus: int, workload: str, dirty_rate_mib: int = DEFAULT_DIRTY_RATE_MIB) -> "BuiltinGuest":
        """Write the guest's image, boot structures and parameter block into ``memory``."""
        path = abi.builtin_guest_path()
        try:
            image = path.read_bytes()
        except OSError as err:
            raise GuestLoadError(f"built-in guest missing at {path}: reinstall mpvmm ({err.strerror})") from err
        loaded = load_elf(memory, image, "built-in guest")
        if loaded.high > layout.GUEST_CODE_ADDR + layout.GUEST_CODE_MAX:
            raise GuestLoadError("built-in guest is larger than its slot in the layout")
        write_boot_structures(memory)
        guest = cls(memory, cpus, loaded.entry)
        params = guest.params
        ctypes.memset(ctypes.addressof(params), 0, ctypes.sizeof(abi.GuestParams))
        params.magic = abi.PARAMS_MAGIC
        params.abi_version = abi.ABI_VERSION
        params.cpus = cpus
        params.workload = workload_id(workload)
        params.demo_sleep_us = DEMO_SLEEP_US
        params.reports_addr = layout.GUEST_REPORTS_ADDR
        params.report_stride = layout.GUEST_REPORT_STRIDE
        params.shared_addr = layout.GUEST_SHARED_ADDR
        params.mmio_testdev_addr = layout.MMIO_TESTDEV_ADDR
        params.uart_port = layout.COM1_PORT
        params.null_port = layout.NULL_PORT
        params.debug_exit_port = layout.DEBUG_EXIT_PORT
        params.sleep_port = layout.SLEEP_PORT
        params.pio_testdev_port = layout.PIO_TESTDEV_PORT
        params.pio_doorbell_port = layout.PIO_TESTDEV_DOORBELL_PORT
        params.mmio_doorbell_addr = layout.MMIO_TESTDEV_DOORBELL_ADDR
        params.doorbell_value = TESTDEV_DOORBELL_VALUE
        params.dirty_rate_mib = dirty_rate_mib
        params.dirty_round_us = DIRTY_ROUND_US
        params.dirty_base, params.dirty_size = dirty_region(cpus, memory.size)
        return guest

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
        """Ask every vCPU to finish its workload, report and exit (not once handed over)."""
        if self._handed_over is None:
            self.params.stop = 1

    def counts(self, index: int) -> GuestCounts:
        if self._handed_over is not None:
            return self._handed_over[0][index]
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
        if self._handed_over is not None:
            return self._handed_over[1]
        return sum(self._shared.counters)

    def ending(self, outcome: VcpuOutcome) -> GuestEvent | None:
        return None  # a vCPU of the built-in guest that stops by a fault is a fault

    def describe(self) -> dict:
        """The workload and every field of the parameter block (a restore checks them against RAM)."""
        params = {name: getattr(self.params, name) for name, _ in abi.GuestParams._fields_ if name != "reserved"}
        return {"kind": "builtin", "workload": abi.WORKLOADS[self.params.workload], "entry": self.entry,
                "params": params}

    def hand_over(self) -> None:
        """Keep the counts as they are now; from here guest RAM is another VMM's."""
        counts = [self.counts(index) for index in range(self.cpus)]
        self._handed_over = (counts, self.atomic_total())
