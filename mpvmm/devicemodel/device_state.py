"""Checks every device's ``from_state`` makes of a record it is handed.

A device's state is a plain msgpack-able dict (``state()``), and a record
may come from a snapshot file or a migration stream, so ``from_state``
trusts nothing: exactly the keys the device writes, each of the type and
range it can hold. A failed check is a DeviceModelError naming the device
and the field.
"""

from __future__ import annotations

from mpvmm.errors import DeviceModelError


def expect_keys(state: object, keys: tuple[str, ...], device: str) -> dict:
    """``state`` as a dict with exactly ``keys``."""
    if not isinstance(state, dict) or set(state) != set(keys):
        raise DeviceModelError(f"{device} state needs exactly the keys {', '.join(keys)}")
    return state


def expect_uint(value: object, bits: int, what: str) -> int:
    """An unsigned integer of at most ``bits`` bits (bool is not one)."""
    if type(value) is not int or not 0 <= value < 1 << bits:
        raise DeviceModelError(f"{what} must be a {bits}-bit unsigned integer, not {value!r:.40}")
    return value


def expect_bytes(value: object, max_length: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_length:
        raise DeviceModelError(f"{what} must be at most {max_length} bytes")
    return value
