"""The VcpuRunner interface, and the set of them one VM has.

A runner runs one vCPU until it stops: ``NativeRunner`` and ``PythonRunner``
(thread_runner.py) on a thread of the supervisor, ``ProcessRunner``
(process_runner.py) in a process of its own. Whatever the runner, the
supervisor stops, pauses and resumes it through the request word of the
vCPU's stats page (stats_page.py), then makes the runner look at it now
(``_kick``); the loop reports where it is in the page's ``state`` word and
how it ended as a ``VcpuOutcome``.
"""

from __future__ import annotations

import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Protocol

from mpvmm.errors import MpvmmError
from mpvmm.vcpu_worker import _runloop
from mpvmm.vcpu_worker.outcome import FAILURES, VcpuOutcome
from mpvmm.vcpu_worker.stats_page import LoopRequest, VcpuStats, WorkerState

# A real-time signal nobody else uses; its handler (installed in C, with no
# SA_RESTART) does nothing but make a blocking call in the loop return EINTR.
KICK_SIGNAL = signal.SIGRTMIN + 2
_runloop.install_kick_handler(KICK_SIGNAL)
# How long a runner told to stop gets to leave its loop before it is killed
# (a process) or reported stuck (a thread).
FORCE_STOP_SECONDS = 5.0
_JOIN_SLICE_SECONDS = 0.1
_PAUSE_POLL_SECONDS = 0.001  # part of a migration's downtime: poll finely


class VcpuRunner(ABC):
    """Runs vCPU ``index`` with the stats page at ``stats_address``."""

    def __init__(self, index: int, stats_address: int):
        self.index = index
        self.stats_address = stats_address
        self.stats = VcpuStats.from_address(stats_address)

    # --- Lifecycle. ---

    @abstractmethod
    def start(self) -> None:
        """Start running the vCPU; returns at once."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """The vCPU's loop has ended (or its thread or process has)."""

    @abstractmethod
    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the runner to finish; True once it has."""

    @abstractmethod
    def kill(self) -> bool:
        """Last resort at teardown, for a runner that ignored a stop; False where impossible."""

    @abstractmethod
    def outcome(self) -> VcpuOutcome | None:
        """How the vCPU's run ended; None while it runs."""

    @property
    @abstractmethod
    def pid(self) -> int:
        """The process running the vCPU (0 for a process runner not yet started)."""

    @property
    @abstractmethod
    def cpu_seconds(self) -> float | None:
        """CPU time of a worker process of its own, once it has ended; None for a thread."""

    # --- Control: write the request, then make sure the loop looks at it. ---

    @abstractmethod
    def _kick(self) -> None:
        """Make the loop leave KVM_RUN or whatever blocking call it is in, now."""

    def stop(self) -> None:
        self.stats.request = LoopRequest.STOP
        _runloop.wake(self.stats_address)  # a paused loop waits on this word
        self._kick()

    def pause(self) -> None:
        self.stats.request = LoopRequest.PAUSE
        self._kick()

    def resume(self) -> None:
        self.stats.request = LoopRequest.RUN
        _runloop.wake(self.stats_address)

    @property
    def paused(self) -> bool:
        return self.stats.state == WorkerState.PAUSED

    def failed(self) -> bool:
        """The runner has ended in a fault, a failed KVM_RUN or a failure of its own."""
        return self.done and isinstance(self.outcome(), FAILURES)


class Stoppable(Protocol):
    """What stop_and_join needs: a VcpuRunner, or the bench's raw loop."""

    index: int

    @property
    def done(self) -> bool: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> bool: ...

    def kill(self) -> bool: ...


def stop_and_join(runners: Sequence[Stoppable], timeout: float = FORCE_STOP_SECONDS) -> None:
    """Stop every runner still running and wait until each is gone (teardown needs them gone).

    Each is told again while it is waited for, in case a kick landed in the
    window between its check of the request and a blocking call. One that
    outlives ``timeout`` is killed where it can be (a process); a thread
    cannot be, so that is an error naming it.
    """
    for runner in runners:
        if not runner.done:
            runner.stop()
    end = time.monotonic() + timeout
    for runner in runners:
        while not runner.join(_JOIN_SLICE_SECONDS):
            if time.monotonic() > end:
                if runner.kill():
                    continue
                raise MpvmmError(f"vcpu {runner.index} did not stop within {timeout:g} s")
            runner.stop()


class VcpuSet:
    """Every vCPU runner of a VM, started, paused, resumed and stopped together."""

    def __init__(self, runners: Sequence[VcpuRunner]):
        self.runners = list(runners)

    def __iter__(self) -> Iterator[VcpuRunner]:
        return iter(self.runners)

    def __len__(self) -> int:
        return len(self.runners)

    def __getitem__(self, index: int) -> VcpuRunner:
        return self.runners[index]

    def start(self, paused: bool = False) -> None:
        """Start every runner; ``paused``, each loop waits before its first KVM_RUN until ``resume``.

        Started paused, the threads or processes are up while the vCPUs'
        state can still be written (a restore), so that resuming is all
        that is left to do.
        """
        for runner in self.runners:
            if paused:
                runner.stats.request = LoopRequest.PAUSE
            runner.start()

    def pause(self) -> None:
        for runner in self.runners:
            runner.pause()

    def resume(self) -> None:
        for runner in self.runners:
            runner.resume()

    def paused(self) -> bool:
        """Every vCPU has stopped in its loop and waits to be resumed."""
        return all(runner.paused for runner in self.runners)

    def wait_paused(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every vCPU reports it is paused."""
        end = time.monotonic() + timeout
        while not self.paused():
            if time.monotonic() >= end:
                return False
            time.sleep(_PAUSE_POLL_SECONDS)
        return True

    def all_done(self) -> bool:
        return all(runner.done for runner in self.runners)

    def failed(self) -> bool:
        return any(runner.failed() for runner in self.runners)

    def stop_and_join(self, timeout: float = FORCE_STOP_SECONDS) -> None:
        stop_and_join(self.runners, timeout)
