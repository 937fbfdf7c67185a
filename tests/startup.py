"""Watching `mpvmm` start: when its own code runs, for tests that signal it at a chosen moment.

Run it with PYTHONPROFILEIMPORTTIME=1: every finished import is a line on
stderr. ``mpvmm.__main__`` imports ``signal`` and then, inside the ``try``
that makes a KeyboardInterrupt quiet, the stop-signal flag and everything
else, so the first import line after ``signal``'s comes from mpvmm's own
code. Before that Python itself is starting (``site``), and a Ctrl-C there
is the interpreter's to report.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading

IMPORT_TIME_ENV = {"PYTHONPROFILEIMPORTTIME": "1"}


class StderrLines:
    """Every line of ``process``'s stderr (a text pipe), read on a thread of its own."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(process.stderr,), name="stderr-reader")
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            self._new.put(line)
        self._new.put(None)

    def wait_for_mpvmm_code(self, timeout: float) -> None:
        """Return once mpvmm's own code runs; AssertionError if it ends or takes longer than ``timeout``."""
        signal_imported = False
        while True:
            try:
                line = self._new.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"mpvmm's code did not run within {timeout} s") from None
            assert line is not None, f"mpvmm ended before its code ran: {''.join(self.lines)}"
            if signal_imported:
                return
            signal_imported = line.rstrip().endswith("| signal")

    def own(self, timeout: float) -> list[str]:
        """The lines that are not import times, once the stream has ended (within ``timeout``)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr still open"
        return [line.rstrip() for line in self.lines if not line.startswith("import time:")]


def import_time_env() -> dict[str, str]:
    return {**os.environ, **IMPORT_TIME_ENV}
