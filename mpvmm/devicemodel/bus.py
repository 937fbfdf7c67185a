"""Address buses of the device model: which device answers which address.

Like Firecracker's ``vstate/bus.rs``: a range type that refuses zero length
and overflow, insertion that refuses overlaps, lookup by bisect. Devices see
offsets from the start of their range, never absolute addresses, so one
device class can sit at any address (the test device is on both buses).

The device model has two buses, one per address space of the protocol:
``pio`` (I/O ports, 0..0xFFFF) and ``mmio`` (guest-physical addresses).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Protocol

from mpvmm.errors import DeviceModelError

# Guest-physical addresses are 64-bit; a range may end exactly at 2**64.
ADDRESS_LIMIT = 1 << 64


class BusError(DeviceModelError):
    """A device range is invalid or collides with one already on the bus."""


class Device(Protocol):
    """What every device on a bus is: a pure state machine seen through offsets."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def stats(self) -> dict[str, int]:
        """Plain counters of what the device saw, for the device model's stats."""

    def state(self) -> dict:
        """Everything needed to rebuild the device (its class's ``from_state``), as msgpack-able values."""


@dataclass(frozen=True, order=True)
class BusRange:
    """The half-open address range ``[base, base + length)``.

    Checked when built, so an empty or wrapping range never reaches a bus.
    """

    base: int
    length: int

    def __post_init__(self) -> None:
        base, length = self.base, self.length
        if type(base) is not int or type(length) is not int:
            raise BusError(f"bus range needs integer base and length, got {base!r}, {length!r}")
        if base < 0:
            raise BusError(f"bus range base {base:#x} is negative")
        if length <= 0:
            raise BusError(
                f"bus range at {base:#x} has length {length}: a device must claim at least one address"
            )
        if base + length > ADDRESS_LIMIT:
            raise BusError(f"bus range {base:#x} + {length:#x} runs past the end of the 64-bit address space")

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.base + self.length

    def contains(self, address: int) -> bool:
        return self.base <= address < self.end

    def overlaps(self, other: "BusRange") -> bool:
        return self.base < other.end and other.base < self.end

    def __str__(self) -> str:
        return f"[{self.base:#x}, {self.end:#x})"


class BusEntry(NamedTuple):
    """One device on a bus: where it sits, the object, and its name for stats."""

    range: BusRange
    device: Device
    name: str


class Bus:
    """A set of non-overlapping ranges, each owned by one device."""

    def __init__(self, name: str):
        self.name = name
        # Two parallel lists sorted by base: bisect works on the plain ints.
        self._bases: list[int] = []
        self._entries: list[BusEntry] = []

    def insert(self, bus_range: BusRange, device: Device, name: str) -> None:
        """Put ``device`` at ``bus_range``; refuse a range another device owns."""
        if not isinstance(bus_range, BusRange):
            raise BusError(f"{self.name} bus: insert needs a BusRange, got {bus_range!r}")
        index = bisect.bisect_left(self._bases, bus_range.base)
        # Sorted and disjoint, so only the neighbours on each side can collide.
        for neighbour in self._entries[max(index - 1, 0) : index + 1]:
            if neighbour.range.overlaps(bus_range):
                raise BusError(
                    f"{self.name} bus: {name} at {bus_range} overlaps "
                    f"{neighbour.name} at {neighbour.range}"
                )
        self._bases.insert(index, bus_range.base)
        self._entries.insert(index, BusEntry(bus_range, device, name))

    def lookup(self, address: int) -> tuple[Device, str, int] | None:
        """The ``(device, name, offset)`` that owns ``address``, or None."""
        index = bisect.bisect_right(self._bases, address) - 1
        if index < 0:
            return None
        entry = self._entries[index]
        if address >= entry.range.end:
            return None
        return entry.device, entry.name, address - entry.range.base

    def __iter__(self) -> Iterator[BusEntry]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        inside = ", ".join(f"{e.name}@{e.range}" for e in self._entries)
        return f"Bus({self.name}: {inside})"
