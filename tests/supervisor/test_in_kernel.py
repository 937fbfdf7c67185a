"""Registering the in-kernel routes on real KVM, through each vCPU host."""

import errno

import pytest

from mpvmm.devicemodel.kernel_routes import kernel_routes
from mpvmm.errors import KvmIoctlError, MpvmmError
from mpvmm.kvm.system import Kvm
from mpvmm.supervisor.builtin_guest import BuiltinGuestSource
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.supervisor.in_kernel import InKernelRoutes
from mpvmm.supervisor.vcpu_host import NativeThreads, ProcessPerVcpu
from mpvmm.vcpu_worker.route_table import ACTION_COALESCED, ACTION_IOEVENTFD, SPACE_PIO, Route, machine_routes


@pytest.fixture
def machine(kvm_available):
    with Kvm() as kvm, GuestMemory(64 << 20) as memory:
        yield kvm, memory, BuiltinGuestSource(2, "doorbell", memory.size).load(memory)


def test_one_vm_gets_every_range_and_the_device_model_its_ring_and_eventfds(machine, no_leaks):
    kvm, memory, guest = machine
    routes = machine_routes(kernel_routes("builtin"))
    with NativeThreads(kvm, memory, guest, 2) as host, InKernelRoutes(host, routes) as in_kernel:
        assert in_kernel.routes is routes
        doorbells = in_kernel.doorbell_fds()
        assert [(space, address) for _, space, address in doorbells] == \
            [(r.space, r.base) for r in routes.in_kernel(ACTION_IOEVENTFD)]
        assert in_kernel.coalesced_ring() == (host.vm.vcpus[0].fd, kvm.coalesced_ring_page())
        # Registered for real: KVM refuses the same eventfd on the same doorbell twice.
        fd, route = in_kernel.doorbells[0]
        with pytest.raises(KvmIoctlError, match="KVM_IOEVENTFD") as info:
            host.add_doorbell(fd, route)
        assert info.value.errno == errno.EEXIST
        # The service any device process's doorbells come from: a new eventfd, registered.
        extra_route = Route(SPACE_PIO, 0x600, 2, ACTION_IOEVENTFD)
        extra = in_kernel.add_doorbell(extra_route)
        with pytest.raises(KvmIoctlError):
            host.add_doorbell(extra, extra_route)
        assert (extra, extra_route) in in_kernel.doorbells


def test_the_process_host_keeps_doorbells_for_its_workers_and_routes_coalesced_ranges_as_writes(machine, no_leaks):
    kvm, memory, guest = machine
    host = ProcessPerVcpu(kvm, memory, guest, 2)
    with InKernelRoutes(host, machine_routes(kernel_routes("builtin"))) as in_kernel:
        assert in_kernel.routes.in_kernel(ACTION_COALESCED) == []
        assert in_kernel.coalesced_ring() is None
        assert host.doorbells == in_kernel.doorbells and len(host.doorbells) == 2
    with pytest.raises(MpvmmError, match="no coalesced ring"):
        host.coalesce(Route(SPACE_PIO, 0x520, 8, ACTION_COALESCED))
