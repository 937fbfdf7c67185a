"""What a user typed, checked the same way by every subcommand: sizes, numbers in range, output files.

Failures are one-line errors: ``argparse.ArgumentTypeError`` while parsing,
``UsageError`` (exit 2) for a check made once the options are known.
"""

import argparse
import errno
import os
import re
import stat
from collections.abc import Callable

from mpvmm.errors import UsageError
from mpvmm.output import names_an_open_file
from mpvmm.x86.layout import PAGE_SIZE

# The longest a duration option may ask for. A year of `mpvmm start` is far
# past any real run (without --seconds it runs until stopped anyway); a day
# between two `mpvmm top` tables is far past any use.
RUN_SECONDS_MAX = 365 * 24 * 3600
TOP_INTERVAL_MAX = 24 * 3600

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '1GiB', '4096' -> bytes; a page-aligned positive size."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512M, 2G, 1048576)")
    size = int(match.group(1)) << _SIZE_SHIFTS[match.group(2).lower()]
    if size <= 0 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a positive multiple of {PAGE_SIZE} bytes")
    return size


def check_writable(path: str, option: str, *, replaced: bool = False) -> None:
    """Refuse an output file that cannot be written, before any work is done; leaves nothing behind.

    An existing file is opened for appending and closed again, which changes
    nothing. A new one (or a file that will be ``replaced`` by a rename,
    output.write_atomically) needs a folder that takes new files: a probe
    file is created there and removed at once.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:  # a path through a file, a loop of links, no permission to look
        raise _refused(path, option, err.errno) from err
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise _refused(path, option, errno.EISDIR)
        _try(path, option, lambda: os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK
                                                     | os.O_NOCTTY | os.O_CLOEXEC)))
        if not (replaced and stat.S_ISREG(mode)) or names_an_open_file(path):
            return  # written in place (output.write_atomically): no new file in the folder
    probe = os.path.join(os.path.dirname(os.path.realpath(path)), f".mpvmm-probe-{os.urandom(8).hex()}")
    _try(path, option, lambda: os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)))
    os.unlink(probe)


def _try(path: str, option: str, action) -> None:
    try:
        action()
    except OSError as err:
        raise _refused(path, option, err.errno) from err


def _refused(path: str, option: str, reason: int) -> UsageError:
    return UsageError(f"{option} {path}: {os.strerror(reason)}")


_SIZE_UNITS = ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB"))


def format_size(size: int) -> str:
    """Bytes in the largest unit that holds them exactly: 4096 -> '4 KiB', 3 << 29 -> '1536 MiB'.

    Every size mpvmm prints goes through here. Exact, never rounded: a limit
    such as "needs at least 2056 KiB" must not read as a smaller one, and
    4096 bytes must not read as "0 MiB".
    """
    for shift, unit in _SIZE_UNITS:
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"


def _number_text(value: float) -> str:
    return f"{value:.0f}" if abs(value) < 1e15 and value == int(value) else f"{value:g}"


def number_problem(value: float, low: float, high: float, *, unit: str = "seconds",
                   low_allowed: bool = True) -> str | None:
    """Why ``value`` is not a number of ``unit`` from ``low`` (allowed or not) to ``high``; None if it is.

    NaN fails every comparison, so it is refused with the infinities and
    whatever lies outside the range: a duration must end, and time.sleep,
    threading, select and JSON take none of them.
    """
    above_low = value >= low if low_allowed else value > low
    if above_low and value <= high:
        return None
    low_text, high_text = _number_text(low), _number_text(high)
    bounds = f"from {low_text} to {high_text}" if low_allowed else f"above {low_text} and at most {high_text}"
    return f"must be a number of {unit} {bounds}, not {_number_text(value)}"


def parse_number(low: float, high: float, *, unit: str = "seconds", low_allowed: bool = True) -> Callable[[str], float]:
    """An argparse ``type``: a finite number within the range of ``number_problem``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of {unit} {text!r}") from None
        problem = number_problem(value, low, high, unit=unit, low_allowed=low_allowed)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def check_number(value: float, option: str, low: float, high: float, *, unit: str = "seconds",
                 low_allowed: bool = True) -> None:
    """The same check for a value that did not come through argparse (a RunConfig, run_top)."""
    problem = number_problem(value, low, high, unit=unit, low_allowed=low_allowed)
    if problem:
        raise UsageError(f"{option} {problem}")
