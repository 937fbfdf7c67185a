"""The built-in guest in a VM: loading it, its parameter block and its reports."""

import ctypes
from dataclasses import dataclass

from mpvmm.errors import GuestLoadError, UsageError
from mpvmm.guest import abi
from mpvmm.x86 import layout
from mpvmm.x86.loader import load_elf

DEMO_SLEEP_US = 2000  # the demo workload rests 2 ms per round: a gentle, steady rate


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


@dataclass
class GuestCounts:
    """What one vCPU of the guest says it did."""

    state: int
    status: int
    ops: dict[str, int]
    pio_write_sum: int
    mmio_write_sum: int


class BuiltinGuest:
    """The built-in guest loaded into ``memory`` for ``cpus`` vCPUs."""

    def __init__(self, memory, cpus: int, workload: str):
        if layout.GUEST_REPORTS_ADDR + cpus * layout.GUEST_REPORT_STRIDE > layout.GUEST_SHARED_ADDR:
            raise UsageError(f"the built-in guest supports at most "
                             f"{(layout.GUEST_SHARED_ADDR - layout.GUEST_REPORTS_ADDR) // layout.GUEST_REPORT_STRIDE} vCPUs")
        self.memory = memory
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
        self._reports = [
            memory.view(layout.GUEST_REPORTS_ADDR + i * layout.GUEST_REPORT_STRIDE, abi.GuestReport)
            for i in range(cpus)
        ]
        self._shared = memory.view(layout.GUEST_SHARED_ADDR, abi.GuestShared)

    def entry_arguments(self, index: int) -> tuple[int, int, int, int]:
        """(entry, stack top, RDI, RSI) for vCPU ``index``."""
        return self.entry, stack_top(index), index, layout.GUEST_PARAMS_ADDR

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
