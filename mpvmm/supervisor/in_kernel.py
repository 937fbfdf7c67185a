"""The device accesses KVM handles without an exit: coalesced writes and doorbells.

The devices of a machine declare them (devicemodel/bus.py, ``KernelAccess``;
devicemodel/kernel_routes.py lists them at their bus addresses) and the route table
carries them (route_table.py, ``ACTION_COALESCED`` and ``ACTION_IOEVENTFD``).
Registering them is a VM ioctl, which KVM accepts only from the address
space that created the VM (docs/design.md, "The address-space rule"), so it
is the supervisor's job, done here for every VM of the run through the vCPU
host. The device processes only get what lets them see the result:

- the coalesced ring: one vCPU fd and the ring's page offset in its mmap,
  which the device model maps (that page alone) and drains;
- a doorbell: an eventfd KVM signals, which the device process waits on in
  epoll. ``add_doorbell`` is the service any device process can be given
  such eventfds from: the device model's test devices use it now, the
  virtio device processes (their QueueNotify registers) will.

``InKernelRoutes`` owns the eventfds and closes them at the end of the run;
KVM holds its own reference to each while a VM has it registered.
"""

from __future__ import annotations

import os

from mpvmm.vcpu_worker.route_table import ACTION_COALESCED, ACTION_IOEVENTFD, Route, RouteTable


class InKernelRoutes:
    """The in-kernel routes of ``routes`` registered on ``host``'s VM(s), and their eventfds."""

    def __init__(self, host, routes: RouteTable):
        self.host = host
        self.routes = host.routes(routes)  # what this host's run loops route by
        self.doorbells: list[tuple[int, Route]] = []
        try:
            for route in self.routes.in_kernel(ACTION_COALESCED):
                host.coalesce(route)
            for route in self.routes.in_kernel(ACTION_IOEVENTFD):
                self.add_doorbell(route)
        except BaseException:
            self.close()
            raise

    def add_doorbell(self, route: Route) -> int:
        """An eventfd KVM signals on every write to ``route`` that matches its datamatch; ours to close."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.host.add_doorbell(fd, route)
        except BaseException:
            os.close(fd)
            raise
        self.doorbells.append((fd, route))
        return fd

    def doorbell_fds(self) -> list[tuple[int, int, int]]:
        """(eventfd, space, address) of each doorbell, as the device model's configure takes them."""
        return [(fd, route.space, route.base) for fd, route in self.doorbells]

    def coalesced_ring(self) -> tuple[int, int] | None:
        """(vCPU fd, page offset) of the coalesced ring the device model drains, or None."""
        return self.host.coalesced_ring() if self.routes.in_kernel(ACTION_COALESCED) else None

    def close(self) -> None:
        for fd, _route in self.doorbells:
            os.close(fd)
        self.doorbells = []

    def __enter__(self) -> "InKernelRoutes":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
