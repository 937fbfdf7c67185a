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


@dataclass(frozen=True)
class Doorbell:
    """A register whose writes KVM turns into an eventfd signal (KVM_IOEVENTFD), with no exit.

    With ``datamatch`` only writes of that value ring it; any other value
    reaches the device as an ordinary write. A ring carries no value, so the
    device is told how many there were (``DoorbellDevice.doorbell``).
    """

    offset: int
    size: int  # 1, 2, 4 or 8: the access width that rings it
    datamatch: int | None = None


@dataclass(frozen=True)
class KernelAccess:
    """What a device lets KVM do for it without an exit: its own declaration.

    ``coalesced``: offset ranges whose writes may be batched in KVM's
    coalesced ring and handled later, in order, before any later request of
    the guest's is (a device whose writes have an effect the guest must see
    at once, like the 8250's transmit interrupt, declares none).
    ``doorbells``: registers whose writes only signal.
    """

    coalesced: tuple["BusRange", ...] = ()
    doorbells: tuple[Doorbell, ...] = ()


NO_KERNEL_ACCESS = KernelAccess()


class Device(Protocol):
    """What every device on a bus is: a pure state machine seen through offsets."""

    # Writes KVM may take for the device (coalesced ranges, doorbells); most declare none.
    kernel_access: KernelAccess

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...

    def stats(self) -> dict[str, int]:
        """Plain counters of what the device saw, for the device model's stats."""

    def state(self) -> dict:
        """Everything needed to rebuild the device (its class's ``from_state``), as msgpack-able values."""


class DoorbellDevice(Device, Protocol):
    """A device that declares doorbells, told how many rings each had."""

    def doorbell(self, offset: int, count: int) -> None: ...


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
