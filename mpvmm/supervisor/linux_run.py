"""``mpvmm start --kernel``: the Supervisor's run, for a Linux guest.

Supervisor.run's lifecycle (one ExitStack, workers, metrics, wait loop,
summary), with the steps a kernel needs instead of the built-in guest's: the kernel and its
tables in RAM, the BSP at the 64-bit entry and the APs left to INIT/SIPI,
the UART's and i8042's interrupts as irqfds, the "pc" device set, host
input in raw mode, and the end of the run told by the guest: power-off and
reboot from the device model (``system_event``), triple fault and
KVM_EXIT_SYSTEM_EVENT from a vCPU.

Exit codes: 0 when the guest powered off or rebooted (i8042 reset, ACPI
reset register, a KVM reset event: ``panic=-1`` ends that way too); 1 for
a triple fault, a crash event or any other VM failure; 128+N for signal N.
"""

from __future__ import annotations

import os
import sys

from mpvmm.errors import UsageError
from mpvmm.kvm import bindings as kb
from mpvmm.supervisor.linux_guest import LinuxBoot, LinuxGuestReport
from mpvmm.supervisor.run import Supervisor
from mpvmm.supervisor.terminal import RawTerminal
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.x86 import layout


# How each way a guest can end reads in the status line, and its exit code.
ENDINGS = {
    "poweroff": ("guest powered off", 0),
    "reboot": ("guest rebooted", 0),
    "triple-fault": ("guest reset by a triple fault", 1),
    "crash": ("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)", 1),
}
_SYSTEM_EVENT_ENDINGS = {
    kb.KVM_SYSTEM_EVENT_SHUTDOWN: "poweroff",
    kb.KVM_SYSTEM_EVENT_RESET: "reboot",
    kb.KVM_SYSTEM_EVENT_CRASH: "crash",
}


class LinuxSupervisor(Supervisor):
    """Boots ``config.kernel`` on ``config.cpus`` vCPUs until it powers off or reboots."""

    def __init__(self, config, on_started=None, on_stopped=None, stdin_fd: int | None = None):
        super().__init__(config, on_started, on_stopped)
        self.ending: str | None = None
        # The terminal to read from; None: no guest input (tests, pipes).
        self.stdin_fd = stdin_fd

    # --- The steps of Supervisor.run that a kernel does differently. ---

    def _check_guest(self) -> None:
        """Read and check the kernel, initrd and command line: bad input creates nothing."""
        if self.config.runner == "process":
            raise UsageError("--runner process has no shared interrupt controller and cannot boot Linux")
        # validate()'s memory minimum is the built-in guest's, far below Linux's: from_files checks.
        self.boot = LinuxBoot.from_files(self.config.kernel, self.config.initrd, self.config.cmdline,
                                         self.config.cpus, self.config.memory)

    def _metrics_info(self) -> dict[str, str]:
        return {**super()._metrics_info(), "workload": "linux"}

    def _build_guest(self, stack, kvm, memory) -> None:
        """The kernel and its tables in RAM, the BSP at its entry, the interrupt lines."""
        self.boot.load(memory)
        self.guest = LinuxGuestReport()
        self.vm = VirtualMachine(kvm, memory, self.config.cpus)
        stack.callback(self.vm.close)
        self.boot.setup_vcpus(kvm, self.vm)
        self.irq_fds = {}
        for name, gsi in layout.IRQ_LINES.items():
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            stack.callback(os.close, fd)
            self.vm.vm.irqfd(fd, gsi)
            self.irq_fds[name] = fd

    def _device_model_options(self, stack) -> dict:
        """The PC device set, its interrupt lines, and the terminal when there is one."""
        terminal = stack.enter_context(RawTerminal(self.stdin_fd)) if self.stdin_fd is not None else None
        stdin_fd = self.stdin_fd if terminal is not None and terminal.active else None
        return {"machine": "pc", "irq_fds": self.irq_fds, "stdin_fd": stdin_fd}

    # --- While it runs. ---

    def _guest_ending(self) -> str | None:
        """Power-off or reboot told by the device model, or a vCPU's shutdown or system event."""
        events = self.device_model.poll_events() if self.device_model.alive() else []
        if events:
            self.ending = events[0]
            return ENDINGS[self.ending][0] if self.ending in ENDINGS else f"guest event {self.ending}"
        for worker in self.workers:
            ending = self._vcpu_ending(worker)
            if ending is not None:
                self.ending = ending
                return f"{ENDINGS[ending][0]} (vcpu {worker.index})"
        return None

    @staticmethod
    def _vcpu_ending(worker) -> str | None:
        """How a vCPU that stopped on a shutdown or system event ended the guest."""
        if not worker.done:
            return None
        outcome, reason = worker.outcome
        if outcome != "fault":
            return None
        if reason == kb.KVM_EXIT_SHUTDOWN:
            return "triple-fault"
        if reason == kb.KVM_EXIT_SYSTEM_EVENT:
            return _SYSTEM_EVENT_ENDINGS.get(worker.vcpu.kvm_run.system_event.type)
        return None

    def _finish_guest(self) -> None:
        self._force_stop()  # a kernel has no stop flag to ask for

    def _exit_code(self, result, status: str) -> tuple[int, str]:
        if self.ending in ENDINGS:
            return ENDINGS[self.ending][1], status
        return super()._exit_code(result, status)


def stdin_terminal() -> int | None:
    """fd 0 when it is a terminal: only then does the guest get host input."""
    try:
        return sys.stdin.fileno() if sys.stdin is not None and os.isatty(sys.stdin.fileno()) else None
    except (OSError, ValueError):
        return None
