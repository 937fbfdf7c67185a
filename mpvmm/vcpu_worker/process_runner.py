"""The process runner: each vCPU is a process with a one-vCPU KVM VM of its own.

KVM refuses KVM_RUN on the supervisor's VM from a forked child
(docs/design.md, "The address-space rule"), so a worker *process* cannot run
one of the supervisor's vCPUs. What it can do is create a VM of its own,
with one vCPU, over the same shared guest RAM: the pages are the same, so
memory is coherent between the workers (the atomics workload still totals
exactly), but each VM has its own interrupt controller, so this serves only
guests that need none, like the built-in guest. Each worker runs the Python
loop with its own GIL.

The child is forked after the device model is up: it inherits the guest RAM
mapping, its stats page and its channel to the device model (two message
queues, or its rings in the shared ring area and the device model's wake-up
eventfd), and needs no names. It registers the run's doorbell eventfds on
its own VM, so KVM signals the device model's eventfds from every worker;
the coalesced ranges reach the device model as ordinary writes
(vcpu_host.py, ``ProcessPerVcpu.routes``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import time

from mpvmm.kvm.system import Kvm
from mpvmm.stop_signals import ignore_stop_signals
from mpvmm.supervisor.vm import VirtualMachine
from mpvmm.vcpu_worker.outcome import VcpuOutcome, WorkerFailed, from_loop
from mpvmm.vcpu_worker.python_loop import run_python
from mpvmm.vcpu_worker.runner import KICK_SIGNAL, VcpuRunner
from mpvmm.vcpu_worker.stats_page import WorkerState

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_PDEATHSIG = 1
_REAP_POLL_SECONDS = 0.01


class ProcessRunner(VcpuRunner):
    """vCPU ``index`` of ``guest`` in a forked process with a VM of its own."""

    def __init__(self, index: int, stats_address: int, routes, channel, memory, guest, doorbells=()):
        super().__init__(index, stats_address)
        self.routes = routes
        self.channel = channel
        self.memory = memory
        self.guest = guest
        self.doorbells = doorbells  # (eventfd, route) pairs to register on the worker's VM
        self._pid = 0
        self._failure: str | None = None  # how the process died, if it did not end cleanly
        self._rusage = None
        self._status: int | None = None  # its wait status, once reaped
        self._outcome: VcpuOutcome | None = None

    def start(self) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child()
            finally:
                os._exit(code)
        self._pid = pid

    # --- In the child. ---

    def _child(self) -> int:
        # Die with the supervisor; leave Ctrl-C, and a SIGTERM or SIGHUP to the
        # whole process group, to it (it stops us through the stats page).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        ignore_stop_signals()
        keep = {0, 1, 2, *self.channel.fds(), *(fd for fd, _route in self.doorbells)}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        with Kvm() as kvm, VirtualMachine(kvm, self.memory, [self.index]) as vm:
            try:
                for fd, route in self.doorbells:
                    vm.add_doorbell(fd, route)
                self.guest.set_up_vcpus(kvm, vm.vcpus)
                code, value = run_python(self.index, vm.vcpus[0], self.stats, self.routes, self.channel)
                self.stats.outcome_value = value
                self.stats.outcome = code
            finally:
                self.stats.state = WorkerState.DONE
        return 0

    # --- In the supervisor. ---

    def _reap(self, block: bool) -> bool:
        if self._status is not None or not self._pid:
            return True  # reaped, or never started (wait4 on pid 0 would reap any child)
        try:
            pid, status, rusage = os.wait4(self._pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        self._status, self._rusage = status, rusage
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            self._failure = f"worker process {self._pid} of vcpu {self.index} was killed by {name}"
        elif os.WEXITSTATUS(status):
            self._failure = (f"worker process {self._pid} of vcpu {self.index} "
                             f"exited with status {os.WEXITSTATUS(status)}")
        return True

    @property
    def done(self) -> bool:
        return self._reap(block=False)

    def join(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._reap(block=False):
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(_REAP_POLL_SECONDS)
        return True

    def _kick(self) -> None:
        if self._pid and self._status is None:
            try:
                os.kill(self._pid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def kill(self) -> bool:
        if self._pid and self._status is None:
            os.kill(self._pid, signal.SIGKILL)
            self._reap(block=True)
        return True

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def cpu_seconds(self) -> float | None:
        return None if self._rusage is None else self._rusage.ru_utime + self._rusage.ru_stime

    def outcome(self) -> VcpuOutcome | None:
        if not self.done:
            return None
        if self._outcome is None:
            # The child's VM and kvm_run are gone with it: a fault comes without details.
            self._outcome = (WorkerFailed(self._failure) if self._failure is not None
                             else from_loop(self.stats.outcome, self.stats.outcome_value))
        return self._outcome
