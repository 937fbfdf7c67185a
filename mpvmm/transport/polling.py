"""How long the device model polls its rings before it sleeps: KVM's halt-polling policy.

A device model that finds no request can go to sleep at once, and then
every request that follows costs the vCPU a wake-up (a syscall, and on a
nested VM an inter-processor interrupt the outer hypervisor handles). Or it
can poll the rings a little while longer, which costs a core. KVM faces the
same choice for a halted vCPU (``halt_poll_ns``, virt/kvm/kvm_main.c) and
answers it by looking at how long each wait turned out to be:

- the wait ended inside the window: polling paid off, keep the window;
- it ended later, but within ``limit``: a longer window would have caught
  it, so grow it;
- it ended after ``limit``: polling could not have helped, so shrink it.

The window never exceeds ``limit``. ``limit`` is chosen by
``poll_limit_seconds``: zero when the vCPUs alone fill the host's cores, so
that polling never takes a core a vCPU needs, and a fixed bound otherwise.
Pure logic: the device model feeds it the waits it measured and reads the
window back.
"""

from __future__ import annotations

import os

# The most a device model polls: long enough to cover what a vCPU does between
# two requests of the device workloads on these hosts (four coalesced writes
# and an exit, about 140-190 us where a null exit costs 70-80 us: twice KVM's
# default 200 us), short enough that a wasted poll costs little, and it gives
# way to any other task at once (server.py).
POLL_LIMIT_SECONDS = 400e-6
# The first window after a shrink to nothing, and the grow and shrink factors (KVM's defaults).
POLL_START_SECONDS = 10e-6
GROW, SHRINK = 2, 2


def poll_limit_seconds(vcpus: int, usable_cores: int | None = None) -> float:
    """The polling bound for a VM of ``vcpus``: none unless a core is left over for the device model."""
    cores = len(os.sched_getaffinity(0)) if usable_cores is None else usable_cores
    return POLL_LIMIT_SECONDS if cores > vcpus else 0.0


class PollWindow:
    """The current polling window, adapted after every wait."""

    def __init__(self, limit: float = POLL_LIMIT_SECONDS, start: float = POLL_START_SECONDS):
        if limit < 0 or start <= 0:
            raise ValueError(f"poll limit {limit} and start {start} must be >= 0 and > 0")
        self.limit = limit
        self.start = min(start, limit)
        self.window = self.start if limit else 0.0
        self.grown = self.shrunk = 0

    def record(self, waited: float) -> None:
        """A wait of ``waited`` seconds (from running out of work to the next request) has ended."""
        if waited <= self.window or not self.limit:
            return
        if waited > self.limit:
            if self.window:
                self.window = 0.0 if self.window / SHRINK < self.start else self.window / SHRINK
                self.shrunk += 1
        else:
            self.window = min(self.limit, max(self.start, self.window * GROW))
            self.grown += 1
