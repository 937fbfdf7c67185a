"""Where the mpvmm program starts: `python -m mpvmm` and the `mpvmm` command alike.

The stop signals become a flag from mpvmm's first line (stop_signals.py):
Ctrl-C, SIGTERM or SIGHUP while the interpreter imports mpvmm (a few
hundred milliseconds on a loaded host) ends the program quietly, with
nothing created, as exit 128+N; from then on ``mpvmm start`` stops its run
cleanly. A Ctrl-C in the few lines before that flag is installed is a
KeyboardInterrupt, also quiet.
"""

import os
import signal
import sys


def run() -> None:
    try:
        from mpvmm.stop_signals import StopSignals

        with StopSignals() as signals:
            from mpvmm.cli import main

            code = main(stop_signals=signals)
    except KeyboardInterrupt:
        _leave(128 + signal.SIGINT)
    sys.exit(code)


def _leave(code: int) -> None:
    """Exit with ``code`` now, past the interpreter's own exit.

    CPython (3.11) marks a KeyboardInterrupt that passed through code run
    from a string as unhandled even once it is caught (dataclasses and
    namedtuple make their methods that way), and its exit then kills the
    process with SIGINT instead of returning the code. Nothing needs the
    interpreter's exit here: only the standard streams are flushed.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
