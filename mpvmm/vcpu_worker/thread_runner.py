"""Runners on a thread of the supervisor, named ``vcpuN``: native and Python.

Both run a vCPU of the supervisor's own VM (KVM accepts KVM_RUN only from
the address space that created the VM: docs/design.md, "The address-space
rule"). What the thread runs decides whether it holds the GIL: the C loop
(``NativeRunner``) releases it for the vCPU's whole life, the Python loop
(``PythonRunner``) is the GIL-bound baseline.
"""

from __future__ import annotations

import os
import signal
import threading
from abc import abstractmethod

from mpvmm.errors import KvmError
from mpvmm.vcpu_worker import _runloop
from mpvmm.vcpu_worker.outcome import LoopCode, VcpuOutcome, WorkerFailed, from_loop
from mpvmm.vcpu_worker.python_loop import run_python
from mpvmm.vcpu_worker.runner import KICK_SIGNAL, VcpuRunner
from mpvmm.vcpu_worker.stats_page import WorkerState


def kick(vcpu, thread: threading.Thread) -> None:
    """Make the thread running ``vcpu`` leave KVM_RUN (or any blocking call) now.

    immediate_exit covers a thread about to enter KVM_RUN; the signal one
    already inside it or blocked on a queue.
    """
    vcpu.kvm_run.immediate_exit = 1
    if thread.ident is not None and thread.is_alive():
        try:
            signal.pthread_kill(thread.ident, KICK_SIGNAL)
        except ProcessLookupError:
            pass  # it finished meanwhile


class ThreadRunner(VcpuRunner):
    """Runs ``vcpu`` (a kvm.vcpu.Vcpu of the supervisor's VM) on its own thread."""

    def __init__(self, vcpu, stats_address: int, routes, channel):
        super().__init__(vcpu.index, stats_address)
        self.vcpu = vcpu
        self.routes = routes
        self.channel = channel  # the vCPU's channel to the device model (transport/channel.py)
        self._error: BaseException | None = None
        self._outcome: VcpuOutcome | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    @abstractmethod
    def _run_loop(self) -> tuple[int, int]:
        """Run the vCPU until it stops; (LoopCode, value)."""

    def _main(self) -> None:
        try:
            code, value = self._run_loop()
        except BaseException as err:  # reported in the outcome, never lost
            self._error = err
            code, value = LoopCode.ERROR, 0
        self.stats.outcome_value = value
        self.stats.outcome = code
        self.stats.state = WorkerState.DONE

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.stats.state == WorkerState.DONE or not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread.ident is None:
            return True  # never started: a build that failed before the vCPUs ran
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def kill(self) -> bool:
        return False  # a thread cannot be killed

    def _kick(self) -> None:
        kick(self.vcpu, self._thread)

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def cpu_seconds(self) -> float | None:
        return None  # /metrics has the thread's CPU time while it runs

    def outcome(self) -> VcpuOutcome | None:
        if not self.done:
            return None
        if self._outcome is None:
            if self._error is not None:
                self._outcome = WorkerFailed(str(self._error))
            else:
                self._outcome = from_loop(self.stats.outcome, self.stats.outcome_value, self.vcpu.kvm_run,
                                          self._registers)
        return self._outcome

    def _registers(self) -> dict[str, int] | None:
        """The general registers of the stopped vCPU, for the fault report."""
        try:
            regs = self.vcpu.get_regs()
        except KvmError:
            return None
        return {name: getattr(regs, name) for name, _ in type(regs)._fields_}


class NativeRunner(ThreadRunner):
    """The C run loop (_runloop.c): no GIL held while the vCPU runs."""

    def _run_loop(self) -> tuple[int, int]:
        return _runloop.run(
            self.vcpu.fd,
            self.vcpu.run_address,
            self.stats_address,
            self.routes.pack(),
            self.channel.native_args(),
            self.index,
            f"vcpu{self.index}",
        )


class PythonRunner(ThreadRunner):
    """The same loop in Python (python_loop.py): the baseline that shows the GIL."""

    def _run_loop(self) -> tuple[int, int]:
        return run_python(self.index, self.vcpu, self.stats, self.routes, self.channel)
