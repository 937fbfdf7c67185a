"""The raw reference run: the built-in guest on KVM alone, through _rawloop.c.

It builds the VM as the supervisor does (guest RAM, boot structures, the
built-in guest, ``VirtualMachine``) and then runs one ``_rawloop.run``
thread per vCPU, with no device model, no route table and no stats page.
Its shape follows ``Supervisor``: ``run()`` returns once every vCPU has
left, and ``on_started`` is called with the run once the vCPUs are going.
"""

import contextlib
import ctypes
import threading
import time
from dataclasses import dataclass, field

from mpvmm.bench import _rawloop
from mpvmm.devicemodel.devices import TESTDEV_PATTERN
from mpvmm.devicemodel.serial import LSR_IDLE_BIT, LSR_OFFSET, LSR_THR_EMPTY_BIT
from mpvmm.errors import MpvmmError, UsageError
from mpvmm.kvm.system import Kvm
from mpvmm.supervisor.builtin_guest import BuiltinGuest, BuiltinGuestSource
from mpvmm.supervisor.guest import GuestCounts
from mpvmm.supervisor.guest_memory import GuestMemory, map_shared, unmap
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.vcpu_worker.outcome import Exited, VcpuOutcome, from_loop, report_fields
from mpvmm.vcpu_worker.runner import stop_and_join
from mpvmm.vcpu_worker.thread_runner import kick
from mpvmm.x86 import layout

CONTROL_STRIDE = _rawloop.layout()["CONTROL_STRIDE"]  # one cache line per vCPU
POLL_SECONDS = 0.01


class RawControl(ctypes.Structure):
    """Mirror of ``struct raw_control`` in _rawloop.c (checked by tests/bench)."""

    _fields_ = [
        ("stop", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("exits", ctypes.c_uint64),
    ]


def raw_machine() -> tuple[int, ...]:
    """Where the guest's devices are and what they answer, in the order _rawloop.run takes them."""
    return (
        layout.MMIO_TESTDEV_ADDR, layout.MMIO_TESTDEV_SIZE,
        layout.PIO_TESTDEV_PORT, layout.PIO_TESTDEV_PORT_COUNT,
        layout.NULL_PORT, layout.SLEEP_PORT, layout.DEBUG_EXIT_PORT, layout.PARAVIRT_PORT_COUNT,
        layout.COM1_PORT + LSR_OFFSET, LSR_THR_EMPTY_BIT | LSR_IDLE_BIT,
        TESTDEV_PATTERN,
    )


@dataclass
class RawVcpuResult:
    index: int
    outcome: VcpuOutcome
    io_exits: int
    mmio_exits: int
    guest: GuestCounts


@dataclass
class RawResult:
    cpus: int
    workload: str
    status: str
    seconds: float
    vcpus: list[RawVcpuResult] = field(default_factory=list)
    atomic_total: int = 0

    @property
    def ok(self) -> bool:
        """Every vCPU left through the debug-exit port with status 0."""
        return all(v.outcome == Exited(0) for v in self.vcpus)


class _RawVcpu:
    """One vCPU's thread running the raw loop."""

    def __init__(self, vcpu, control: RawControl):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.control = control
        self.result: tuple[int, int, int, int] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    def _main(self) -> None:
        try:
            self.result = _rawloop.run(self.vcpu.fd, self.vcpu.run_address, ctypes.addressof(self.control),
                                       raw_machine(), f"vcpu{self.index}")
        except BaseException as err:  # reported in the result, never lost
            self.error = err

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Force the loop out: the flag, then immediate_exit and the kick, as the native worker."""
        self.control.stop = 1
        kick(self.vcpu, self._thread)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def kill(self) -> bool:
        return False  # a thread cannot be killed


class RawRun:
    """Runs the built-in guest's ``workload`` on ``cpus`` vCPUs with the raw loop."""

    def __init__(self, cpus: int, workload: str, memory: int = 64 << 20, on_started=None):
        self.cpus = cpus
        self.workload = workload
        self.memory_size = memory
        self.on_started = on_started  # called with the RawRun once vCPUs run
        self.guest: BuiltinGuest | None = None
        self.vcpus: list[_RawVcpu] = []
        self._controls = None

    def run(self) -> RawResult:
        if self.cpus < 1:
            raise UsageError(f"--cpus must be at least 1, not {self.cpus}")
        source = BuiltinGuestSource(self.cpus, self.workload, self.memory_size)
        with contextlib.ExitStack() as stack:
            kvm = stack.enter_context(Kvm())
            kvm.require_capabilities()
            if self.cpus > kvm.max_vcpus():
                raise UsageError(f"--cpus {self.cpus} is more than KVM allows on this host ({kvm.max_vcpus()})")
            memory = stack.enter_context(GuestMemory(self.memory_size))
            self.guest = source.load(memory)
            vm = stack.enter_context(VirtualMachine(kvm, memory, range(self.cpus)))
            self.guest.set_up_vcpus(kvm, vm.vcpus)
            size = self.cpus * CONTROL_STRIDE
            base = map_shared(-1, size)  # zeroed, page aligned
            stack.callback(unmap, base, size)
            self._controls = [RawControl.from_address(base + i * CONTROL_STRIDE) for i in range(self.cpus)]
            self.vcpus = [_RawVcpu(vcpu, control) for vcpu, control in zip(vm.vcpus, self._controls)]
            stack.callback(self._force_stop)
            started = time.monotonic()
            for vcpu in self.vcpus:
                vcpu.start()
            if self.on_started:
                self.on_started(self)
            while not all(v.done for v in self.vcpus):
                time.sleep(POLL_SECONDS)  # a KeyboardInterrupt here still stops every vCPU
            seconds = time.monotonic() - started
            return self._collect(seconds)

    # --- While it runs: what the bench reads and asks. ---

    def exits(self) -> list[int]:
        """Port-I/O and MMIO exits of each vCPU so far."""
        return [control.exits for control in self._controls]

    def tids(self) -> list[int]:
        """Each vCPU thread's kernel thread id (0 until its loop has started)."""
        return [control.tid for control in self._controls]

    def done(self) -> bool:
        return all(v.done for v in self.vcpus)

    def request_stop(self) -> None:
        """Ask the guest to finish; force the vCPUs that do not in time (from any thread)."""
        self.guest.request_stop()
        end = time.monotonic() + self.guest.stop_grace_seconds
        while time.monotonic() < end and not self.done():
            time.sleep(POLL_SECONDS)
        for vcpu in self.vcpus:
            if not vcpu.done:
                vcpu.stop()

    def _force_stop(self) -> None:
        """Stop every vCPU still running and wait for its thread (the teardown needs them gone)."""
        stop_and_join(self.vcpus)

    def _collect(self, seconds: float) -> RawResult:
        result = RawResult(self.cpus, self.workload, "guest exited", seconds,
                           atomic_total=self.guest.atomic_total())
        for vcpu in self.vcpus:
            if vcpu.error is not None:
                raise MpvmmError(f"raw vcpu {vcpu.index} failed: {vcpu.error}") from vcpu.error
            code, value, io_exits, mmio_exits = vcpu.result
            outcome = from_loop(code, value, vcpu.vcpu.kvm_run)
            if not isinstance(outcome, Exited):
                name, value = report_fields(outcome)
                result.status = f"vcpu {vcpu.index} {name} ({value})"
            result.vcpus.append(RawVcpuResult(vcpu.index, outcome, io_exits, mmio_exits,
                                              self.guest.counts(vcpu.index)))
        return result
