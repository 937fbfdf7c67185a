"""The exit route table the supervisor gives every vCPU worker.

Only the paravirtual ports are native; every other port and MMIO address
goes to the device model, which owns both its devices and "unmapped".
"""

from mpvmm.vcpu_worker import stats as st
from mpvmm.x86 import layout


def builtin_routes() -> list[tuple[int, int, int, int]]:
    """(space, base, length, action) entries for the run loop."""
    return [
        (st.SPACE_PIO, layout.NULL_PORT, layout.PARAVIRT_PORT_COUNT, st.ACTION_NULL),
        (st.SPACE_PIO, layout.DEBUG_EXIT_PORT, layout.PARAVIRT_PORT_COUNT, st.ACTION_DEBUG_EXIT),
        (st.SPACE_PIO, layout.SLEEP_PORT, layout.PARAVIRT_PORT_COUNT, st.ACTION_SLEEP),
    ]
