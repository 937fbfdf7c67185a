"""The exit route table: which accesses a vCPU worker handles itself, and which KVM does.

A route maps a range of ports or guest-physical addresses to an action. The
native actions (null, sleep, debug-exit) are handled in the worker with no
IPC. The in-kernel actions are ranges KVM handles without an exit: the
supervisor registers a *coalesced* range's writes with KVM's coalesced ring
(KVM_REGISTER_COALESCED_MMIO) and an *ioeventfd* range as a doorbell
(KVM_IOEVENTFD); the device model drains and counts both. Everything else,
mapped or not, goes to the device model: a write is *posted* (sent, the
vCPU resumes at once), a read is *sync* (the vCPU waits for the reply). The
exits an in-kernel range still makes take those paths too, except a write
to a coalesced range, which exits only when KVM's ring is full and then
waits to be acknowledged (*fallback*) so that it cannot overtake the ring.
The C loop (_runloop.c, route_action) reads the same table packed by
``pack``; this class is the pure, testable statement of the rule.
"""

import struct
from collections.abc import Iterable
from typing import NamedTuple

from mpvmm.x86 import layout

SPACE_PIO, SPACE_MMIO = 0, 1
ACTION_DEVICE, ACTION_NULL, ACTION_DEBUG_EXIT, ACTION_SLEEP = 0, 1, 2, 3
ACTION_COALESCED, ACTION_IOEVENTFD = 4, 5
NATIVE_ACTIONS = (ACTION_NULL, ACTION_DEBUG_EXIT, ACTION_SLEEP)
IN_KERNEL_ACTIONS = (ACTION_COALESCED, ACTION_IOEVENTFD)
_PACKED = struct.Struct("<QQII")  # struct route: base, length, space, action


class Route(NamedTuple):
    space: int
    base: int
    length: int
    action: int
    datamatch: int | None = None  # an ioeventfd range signals only on writes of this value


class RouteTable:
    """An ordered list of non-overlapping routes; the first match wins."""

    def __init__(self, routes: list[Route]):
        for route in routes:
            if route.space not in (SPACE_PIO, SPACE_MMIO) or \
                    route.action not in NATIVE_ACTIONS + IN_KERNEL_ACTIONS + (ACTION_DEVICE,):
                raise ValueError(f"bad route {route}")
            if route.length <= 0 or route.base + route.length > 1 << 64:
                raise ValueError(f"route {route} has an empty or overflowing range")
            if route.datamatch is not None and route.action != ACTION_IOEVENTFD:
                raise ValueError(f"route {route}: only an ioeventfd range has a datamatch")
        for i, a in enumerate(routes):
            for b in routes[i + 1:]:
                if a.space == b.space and a.base < b.base + b.length and b.base < a.base + a.length:
                    raise ValueError(f"routes {a} and {b} overlap")
        self.routes = list(routes)

    def action(self, space: int, address: int) -> int:
        for route in self.routes:
            if route.space == space and route.base <= address < route.base + route.length:
                return route.action
        return ACTION_DEVICE

    def path(self, space: int, address: int, is_write: bool) -> str:
        """'native', 'posted', 'sync' or 'fallback': how an access that exits travels."""
        action = self.action(space, address)
        if action in NATIVE_ACTIONS:
            return "native"
        if not is_write:
            return "sync"
        return "fallback" if action == ACTION_COALESCED else "posted"

    def in_kernel(self, action: int) -> list[Route]:
        """The routes of one in-kernel action, for registration with KVM."""
        return [route for route in self.routes if route.action == action]

    def without_coalescing(self) -> "RouteTable":
        """The table for a VM with no coalesced ring to drain: those ranges go to the device model."""
        return RouteTable([route._replace(action=ACTION_DEVICE) if route.action == ACTION_COALESCED else route
                           for route in self.routes])

    def pack(self) -> bytes:
        """The table as the C run loop reads it (an array of struct route)."""
        return b"".join(_PACKED.pack(r.base, r.length, r.space, r.action) for r in self.routes)


def paravirt_routes() -> RouteTable:
    """The table of a VM with no in-kernel ranges: the paravirtual ports are native, the rest goes to the device model."""
    return RouteTable([
        Route(SPACE_PIO, layout.NULL_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_NULL),
        Route(SPACE_PIO, layout.DEBUG_EXIT_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_DEBUG_EXIT),
        Route(SPACE_PIO, layout.SLEEP_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_SLEEP),
    ])


def machine_routes(kernel_routes: Iterable) -> RouteTable:
    """The table of a VM: the paravirtual ports, then the in-kernel ranges its devices declared.

    ``kernel_routes`` are devicemodel.kernel_routes.KernelRoute values (space, base,
    length, doorbell, datamatch); the rest goes to the device model.
    """
    return RouteTable(paravirt_routes().routes + [
        Route(r.space, r.base, r.length, ACTION_IOEVENTFD if r.doorbell else ACTION_COALESCED, r.datamatch)
        for r in kernel_routes
    ])
