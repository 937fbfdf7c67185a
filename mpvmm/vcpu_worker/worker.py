"""One vCPU worker: a thread named ``vcpuN`` that runs a vCPU until it stops.

The thread is a plain Python thread; what it runs decides whether it holds
the GIL: the native loop (native.py) releases it for the vCPU's whole life,
the Python loop (python_loop.py) is the GIL-bound baseline. Both read the
same request word and write the same stats area (stats.py), so stopping,
pausing and counting work the same for either.
"""

import signal
import threading
import time
from dataclasses import dataclass

from mpvmm.errors import MpvmmError
from mpvmm.vcpu_worker import _runloop
from mpvmm.vcpu_worker import stats_page

# A real-time signal nobody else uses; its handler (installed in C, with no
# SA_RESTART) does nothing but make a blocking call in the worker return EINTR.
KICK_SIGNAL = signal.SIGRTMIN + 2
_runloop.install_kick_handler(KICK_SIGNAL)

OUTCOME_NAMES = {
    stats_page.OUTCOME_NONE: "none",
    stats_page.OUTCOME_STOPPED: "stopped",
    stats_page.OUTCOME_EXITED: "exited",
    stats_page.OUTCOME_FAULT: "fault",
    stats_page.OUTCOME_ERROR: "error",
}


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


def stop_and_join(workers, timeout: float) -> None:
    """Stop every worker still running and wait until each is gone (teardown needs them gone).

    Each is kicked again while it is waited for, in case a kick landed in the
    window between its check of the request word and a blocking call. One
    that outlives ``timeout`` is killed if it is a process (``kill``); a
    thread cannot be, so that is an error naming it.
    """
    for worker in workers:
        if not worker.done:
            worker.stop()
    end = time.monotonic() + timeout
    for worker in workers:
        while not worker.join(0.1):
            if time.monotonic() > end:
                if hasattr(worker, "kill"):
                    worker.kill()
                    continue
                raise MpvmmError(f"vcpu {worker.index} did not stop within {timeout:g} s")
            worker.stop()


@dataclass
class WorkerChannel:
    """What a worker needs to reach the device model: its two queues."""

    request_queue: object  # posix_ipc.MessageQueue
    reply_queue: object


class WorkerControl:
    """Stop, pause and resume through the request word of the stats page.

    The worker reads the word; ``_kick`` (the subclass's) makes it look now.
    """

    stats: stats_page.VcpuStats
    stats_address: int

    def _kick(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stats.request = stats_page.REQUEST_STOP
        _runloop.wake(self.stats_address)  # a paused worker waits on this word
        self._kick()

    def pause(self) -> None:
        self.stats.request = stats_page.REQUEST_PAUSE
        self._kick()

    def resume(self) -> None:
        self.stats.request = stats_page.REQUEST_RUN
        _runloop.wake(self.stats_address)


class VcpuWorker(WorkerControl):
    """Runs ``vcpu`` on its own thread with the loop ``loop(worker)``."""

    def __init__(self, vcpu, stats_address: int, routes, channel: WorkerChannel, loop):
        self.vcpu = vcpu
        self.index = vcpu.index
        self.stats_address = stats_address
        self.stats = stats_page.VcpuStats.from_address(stats_address)
        self.routes = routes
        self.channel = channel
        self.error: BaseException | None = None
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)

    def _main(self) -> None:
        try:
            outcome, value = self._loop(self)
        except BaseException as err:  # reported by the supervisor, never lost
            self.error = err
            outcome, value = stats_page.OUTCOME_ERROR, 0
        self.stats.outcome_value = value
        self.stats.outcome = outcome
        self.stats.state = stats_page.STATE_DONE

    def start(self) -> None:
        self._thread.start()

    @property
    def done(self) -> bool:
        return self.stats.state == stats_page.STATE_DONE or not self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- Control: write the request, then make sure the thread looks at it. ---

    def _kick(self) -> None:
        kick(self.vcpu, self._thread)

    @property
    def outcome(self) -> tuple[str, int]:
        return OUTCOME_NAMES.get(self.stats.outcome, "unknown"), self.stats.outcome_value
