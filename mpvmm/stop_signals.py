"""The signals that stop a run, and who handles them.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop a run: a terminal sends them to the
whole foreground process group, a service manager or ``timeout`` often to
the whole group too. Only the supervisor acts on them (``StopSignals``): it
asks the guest to finish, stops the vCPUs, then shuts the device model down
and prints the summary, exit 128+N. Every other mpvmm process (the device
model, the process runner's workers) ignores them, so none dies first and
turns a clean stop into "device model died", exit 1.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """Turns the stop signals into a flag while installed (the first one received).

    The mpvmm program installs one at its first line (``mpvmm.__main__``),
    so a stop signal is never a KeyboardInterrupt that an import could
    swallow (CPython drops one raised in a weakref callback, and the run it
    should have stopped then ran on); ``mpvmm start`` keeps it to the end,
    through the summary and the report; other subcommands get the usual
    KeyboardInterrupt back (``restore``).
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "StopSignals":
        if not self._previous and threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers in place before ``install``. Idempotent."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def signal_received(self) -> int | None:
        """The first stop signal received, or None (a callable for waits that must give up on one)."""
        return self.received

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def ignore_stop_signals() -> None:
    """In a process other than the supervisor: let the supervisor stop us, in order.

    A process started with them blocked (the device model) may have one
    pending: ignoring discards it, and only then are they unblocked.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
