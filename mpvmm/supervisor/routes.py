"""The route table of an mpvmm machine: only the paravirtual ports are native."""

from mpvmm.vcpu_worker.routes import (
    ACTION_DEBUG_EXIT, ACTION_NULL, ACTION_SLEEP, SPACE_PIO, Route, RouteTable,
)
from mpvmm.x86 import layout


def builtin_routes() -> RouteTable:
    return RouteTable([
        Route(SPACE_PIO, layout.NULL_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_NULL),
        Route(SPACE_PIO, layout.DEBUG_EXIT_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_DEBUG_EXIT),
        Route(SPACE_PIO, layout.SLEEP_PORT, layout.PARAVIRT_PORT_COUNT, ACTION_SLEEP),
    ])
