"""Checks of what a user typed that every command shares; failures are UsageErrors."""

from mpvmm.errors import UsageError


def check_writable(path: str, option: str) -> None:
    """Refuse an output file that cannot be written before any work is done."""
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: {err.strerror}") from err
