"""Where the mpvmm program starts: `python -m mpvmm` and the `mpvmm` command alike.

Ctrl-C while the interpreter imports mpvmm (a few hundred milliseconds on a
loaded host) or before a run catches stop signals is a KeyboardInterrupt
with nothing yet to clean up: it ends the program quietly, with the exit
code of a run stopped by SIGINT, instead of a traceback. Once a run
catches the stop signals, Ctrl-C stops the VM cleanly (stop_signals.py).
"""

import signal
import sys


def run() -> None:
    try:
        from mpvmm.cli import main

        code = main()
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    sys.exit(code)


if __name__ == "__main__":
    run()
