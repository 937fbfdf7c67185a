"""The exit route table: which accesses a vCPU worker handles itself.

A route maps a range of ports or guest-physical addresses to an action. The
native actions (null, sleep, debug-exit) are handled in the worker with no
IPC; everything else, mapped or not, goes to the device model: a write is
*posted* (sent, the vCPU resumes at once), a read is *sync* (the vCPU waits
for the reply). The C loop (_runloop.c, route_action) reads the same table
packed by ``pack``; this class is the pure, testable statement of the rule.
"""

import struct
from typing import NamedTuple

from mpvmm.x86 import layout

SPACE_PIO, SPACE_MMIO = 0, 1
ACTION_DEVICE, ACTION_NULL, ACTION_DEBUG_EXIT, ACTION_SLEEP = 0, 1, 2, 3
NATIVE_ACTIONS = (ACTION_NULL, ACTION_DEBUG_EXIT, ACTION_SLEEP)
_PACKED = struct.Struct("<QQII")  # struct route: base, length, space, action


class Route(NamedTuple):
    space: int
    base: int
    length: int
    action: int


class RouteTable:
    """An ordered list of non-overlapping routes; the first match wins."""

    def __init__(self, routes: list[Route]):
        for route in routes:
            if route.space not in (SPACE_PIO, SPACE_MMIO) or route.action not in NATIVE_ACTIONS + (ACTION_DEVICE,):
                raise ValueError(f"bad route {route}")
            if route.length <= 0 or route.base + route.length > 1 << 64:
                raise ValueError(f"route {route} has an empty or overflowing range")
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
        """'native', 'posted' or 'sync': how an access travels."""
        if self.action(space, address) != ACTION_DEVICE:
            return "native"
        return "posted" if is_write else "sync"

    def pack(self) -> bytes:
        """The table as the C run loop reads it (an array of struct route)."""
        return b"".join(_PACKED.pack(r.base, r.length, r.space, r.action) for r in self.routes)


def paravirt_routes() -> RouteTable:
    """The table of every mpvmm VM: the paravirtual ports are native, the rest goes to the device model."""
    return RouteTable([
        Route(SPACE_PIO, layout.NULL_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_NULL),
        Route(SPACE_PIO, layout.DEBUG_EXIT_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_DEBUG_EXIT),
        Route(SPACE_PIO, layout.SLEEP_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_SLEEP),
    ])
