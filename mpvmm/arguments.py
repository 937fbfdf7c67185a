"""What a user typed, checked the same way by every subcommand: sizes and output files.

Failures are one-line errors: ``argparse.ArgumentTypeError`` while parsing,
``UsageError`` (exit 2) for a check made once the options are known.
"""

import argparse
import re

from mpvmm.errors import UsageError
from mpvmm.x86.layout import PAGE_SIZE

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


def check_writable(path: str, option: str) -> None:
    """Refuse an output file that cannot be written before any work is done."""
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror}") from err
