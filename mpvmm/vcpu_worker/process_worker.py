"""The process runner: each vCPU is a process with its own one-vCPU KVM VM.

KVM refuses KVM_RUN on the supervisor's VM from a forked child (DESIGN.md,
fact 1), so a worker *process* cannot run one of the supervisor's vCPUs.
What it can do is create a VM of its own, with one vCPU, over the same
shared guest RAM: the pages are the same, so memory is coherent between the
workers (the atomics workload still totals exactly), but each VM has its own
interrupt controller, so this serves only guests that need none, like the
built-in guest. Each worker runs the Python loop with its own GIL.

The child is forked after the device model is up: it inherits the guest RAM
mapping, its stats page and its two message queues, and needs no names.
"""

import ctypes
import ctypes.util
import os
import signal
import time
from types import SimpleNamespace

from mpvmm.kvm.system import Kvm
from mpvmm.vcpu_worker import stats_page
from mpvmm.vcpu_worker.python_loop import run_python
from mpvmm.vcpu_worker.worker import KICK_SIGNAL, OUTCOME_NAMES, WorkerControl

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_PDEATHSIG = 1


class ProcessWorker(WorkerControl):
    """vCPU ``index`` as a forked process; the same control surface as VcpuWorker."""

    def __init__(self, index: int, memory, guest, stats_address: int, routes, channel):
        self.index = index
        self.memory = memory
        self.guest = guest
        self.stats_address = stats_address
        self.stats = stats_page.VcpuStats.from_address(stats_address)
        self.routes = routes
        self.channel = channel
        self.pid = 0
        self.error: str | None = None
        self.rusage = None
        self._status = None

    def start(self) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self._child()
            finally:
                os._exit(code)
        self.pid = pid

    # --- In the child. ---

    def _child(self) -> int:
        # Die with the supervisor; leave Ctrl-C to it (it stops us through the stats page).
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for signum in (signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        keep = {0, 1, 2, self.channel.request_queue.mqd, self.channel.reply_queue.mqd}
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        from mpvmm.supervisor.vm import VirtualMachine  # the child builds its own VM

        with Kvm() as kvm:
            vm = VirtualMachine(kvm, self.memory, 1)
            try:
                vm.enter_user_mode(0, *self.guest.entry_arguments(self.index))
                context = SimpleNamespace(index=self.index, vcpu=vm.vcpus[0], stats=self.stats,
                                          routes=self.routes, channel=self.channel)
                outcome, value = run_python(context)
                self.stats.outcome_value = value
                self.stats.outcome = outcome
            finally:
                self.stats.state = stats_page.STATE_DONE
                vm.close()
        return 0

    # --- In the supervisor. ---

    def _reap(self, block: bool) -> bool:
        if self._status is not None:
            return True
        try:
            pid, status, rusage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False
        self._status, self.rusage = status, rusage
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            self.error = f"worker process {self.pid} of vcpu {self.index} was killed by {name}"
        elif os.WEXITSTATUS(status):
            self.error = f"worker process {self.pid} of vcpu {self.index} exited with status {os.WEXITSTATUS(status)}"
        return True

    @property
    def done(self) -> bool:
        return self._reap(block=False)

    def join(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        while not self._reap(block=False):
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.01)
        return True

    def _kick(self) -> None:
        if self.pid and self._status is None:
            try:
                os.kill(self.pid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Last resort at teardown: the process did not stop when asked."""
        if self.pid and self._status is None:
            os.kill(self.pid, signal.SIGKILL)
            self._reap(block=True)

    @property
    def outcome(self) -> tuple[str, int]:
        if self.error and self.stats.state != stats_page.STATE_DONE:
            return "error", 0
        return OUTCOME_NAMES.get(self.stats.outcome, "unknown"), self.stats.outcome_value

    @property
    def cpu_seconds(self) -> float | None:
        return None if self.rusage is None else self.rusage.ru_utime + self.rusage.ru_stime
