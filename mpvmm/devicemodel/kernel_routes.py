"""The accesses KVM handles for a machine's devices, at their bus addresses.

``kernel_routes(name)`` lists what the devices of machine ``name``
(machines.py) declare KVM may take without an exit (bus.py,
``KernelAccess``): the ranges whose writes KVM coalesces and the doorbells
it turns into eventfd signals, at the addresses the buses put them. The
supervisor registers them with KVM (it alone may issue VM ioctls) and puts
them in the route table; the device model drains and counts them.
"""

from __future__ import annotations

from typing import NamedTuple

from mpvmm.devicemodel.bus import Bus
from mpvmm.devicemodel.machines import build_machine
from mpvmm.devicemodel.protocol import SPACE_MMIO, SPACE_PIO


class KernelRoute(NamedTuple):
    """A range KVM handles for a device: its writes coalesced, or a doorbell."""

    space: int  # protocol.SPACE_PIO or SPACE_MMIO
    base: int
    length: int
    device: str
    doorbell: bool  # False: a coalesced range
    datamatch: int | None = None  # a doorbell rung only by this value


def bus_kernel_routes(space: int, bus: Bus) -> list[KernelRoute]:
    """Every device's declaration on ``bus``, at the addresses the bus gives it."""
    routes = []
    for entry in bus:
        access = entry.device.kernel_access
        for block in access.coalesced:
            routes.append(KernelRoute(space, entry.range.base + block.base, block.length, entry.name, False))
        for bell in access.doorbells:
            routes.append(KernelRoute(space, entry.range.base + bell.offset, bell.size, entry.name, True,
                                      bell.datamatch))
    return routes


def kernel_routes(name: str) -> list[KernelRoute]:
    """What KVM may handle for machine ``name``'s devices (built inert, only to be asked)."""
    pio, mmio, _ = build_machine(name, None, {}, lambda event: None)
    return bus_kernel_routes(SPACE_PIO, pio) + bus_kernel_routes(SPACE_MMIO, mmio)
