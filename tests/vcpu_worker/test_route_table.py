"""The exit route table as a pure state machine: which accesses go where."""

import struct

import pytest

from mpvmm.devicemodel.kernel_routes import kernel_routes
from mpvmm.devicemodel.devices import TESTDEV_DOORBELL_VALUE
from mpvmm.vcpu_worker.route_table import (
    ACTION_COALESCED, ACTION_DEBUG_EXIT, ACTION_DEVICE, ACTION_IOEVENTFD, ACTION_NULL, ACTION_SLEEP, SPACE_MMIO,
    SPACE_PIO, Route, RouteTable, machine_routes, paravirt_routes,
)
from mpvmm.x86 import layout


def test_native_ports_are_native_for_reads_and_writes():
    table = paravirt_routes()
    for port, action in ((layout.NULL_PORT, ACTION_NULL), (layout.DEBUG_EXIT_PORT, ACTION_DEBUG_EXIT),
                         (layout.SLEEP_PORT, ACTION_SLEEP)):
        for offset in range(layout.PARAVIRT_PORT_COUNT):
            assert table.action(SPACE_PIO, port + offset) == action
            assert table.path(SPACE_PIO, port + offset, is_write=True) == "native"
            assert table.path(SPACE_PIO, port + offset, is_write=False) == "native"


@pytest.mark.parametrize("space, address", [
    (SPACE_PIO, layout.COM1_PORT),
    (SPACE_PIO, layout.PIO_TESTDEV_PORT),
    (SPACE_PIO, 0xFFFF),  # unmapped ports belong to the device model too
    (SPACE_PIO, layout.NULL_PORT - 1),
    (SPACE_PIO, layout.SLEEP_PORT + layout.PARAVIRT_PORT_COUNT),
    (SPACE_MMIO, layout.MMIO_TESTDEV_ADDR),
    (SPACE_MMIO, layout.NULL_PORT),  # the same number in the other space is not the null port
])
def test_everything_else_is_posted_when_written_and_sync_when_read(space, address):
    table = paravirt_routes()
    assert table.action(space, address) == ACTION_DEVICE
    assert table.path(space, address, is_write=True) == "posted"
    assert table.path(space, address, is_write=False) == "sync"


def test_range_ends_are_exclusive():
    table = RouteTable([Route(SPACE_MMIO, 0x1000, 0x10, ACTION_NULL)])
    assert table.action(SPACE_MMIO, 0x0FFF) == ACTION_DEVICE
    assert table.action(SPACE_MMIO, 0x1000) == ACTION_NULL
    assert table.action(SPACE_MMIO, 0x100F) == ACTION_NULL
    assert table.action(SPACE_MMIO, 0x1010) == ACTION_DEVICE


def test_a_route_may_end_at_the_top_of_the_address_space():
    table = RouteTable([Route(SPACE_MMIO, 2**64 - 16, 16, ACTION_NULL)])
    assert table.action(SPACE_MMIO, 2**64 - 1) == ACTION_NULL


@pytest.mark.parametrize("routes", [
    [Route(SPACE_PIO, 0x10, 0, ACTION_NULL)],  # empty
    [Route(SPACE_MMIO, 2**64 - 1, 2, ACTION_NULL)],  # past the top
    [Route(SPACE_PIO, 0x10, 4, ACTION_NULL), Route(SPACE_PIO, 0x13, 4, ACTION_SLEEP)],  # overlap
    [Route(7, 0x10, 4, ACTION_NULL)],  # no such space
    [Route(SPACE_PIO, 0x10, 4, 9)],  # no such action
])
def test_bad_tables_are_refused(routes):
    with pytest.raises(ValueError):
        RouteTable(routes)


def test_same_range_in_different_spaces_does_not_overlap():
    table = RouteTable([Route(SPACE_PIO, 0x10, 4, ACTION_NULL), Route(SPACE_MMIO, 0x10, 4, ACTION_SLEEP)])
    assert table.action(SPACE_PIO, 0x11) == ACTION_NULL
    assert table.action(SPACE_MMIO, 0x11) == ACTION_SLEEP


def test_pack_is_the_c_struct_route_array():
    table = paravirt_routes()
    packed = table.pack()
    entries = [struct.unpack_from("<QQII", packed, offset) for offset in range(0, len(packed), 24)]
    assert entries == [(r.base, r.length, r.space, r.action) for r in table.routes]


# --- In-kernel routes: what KVM takes, and the exits it still leaves us. ---


def test_the_machines_devices_declare_the_in_kernel_ranges():
    table = machine_routes(kernel_routes("builtin"))
    coalesced = {(r.space, r.base, r.length) for r in table.in_kernel(ACTION_COALESCED)}
    doorbells = {(r.space, r.base, r.length, r.datamatch) for r in table.in_kernel(ACTION_IOEVENTFD)}
    assert coalesced == {(SPACE_PIO, layout.PIO_TESTDEV_PORT, layout.PIO_TESTDEV_REGISTERS),
                         (SPACE_MMIO, layout.MMIO_TESTDEV_ADDR, layout.MMIO_TESTDEV_REGISTERS)}
    assert doorbells == {(SPACE_PIO, layout.PIO_TESTDEV_DOORBELL_PORT, 4, None),
                         (SPACE_MMIO, layout.MMIO_TESTDEV_DOORBELL_ADDR, 8, TESTDEV_DOORBELL_VALUE)}
    assert table.action(SPACE_PIO, layout.COM1_PORT) == ACTION_DEVICE  # the 8250 is never coalesced
    assert table.action(SPACE_PIO, layout.NULL_PORT) == ACTION_NULL
    # The PC machine has the same test devices, and nothing else in the kernel.
    assert machine_routes(kernel_routes("pc")).routes == table.routes


def test_exits_from_in_kernel_ranges_take_the_fallback_posted_and_sync_paths():
    table = machine_routes(kernel_routes("builtin"))
    assert table.path(SPACE_PIO, layout.PIO_TESTDEV_PORT, is_write=True) == "fallback"  # KVM's ring was full
    assert table.path(SPACE_PIO, layout.PIO_TESTDEV_PORT, is_write=False) == "sync"  # reads always exit
    assert table.path(SPACE_MMIO, layout.MMIO_TESTDEV_DOORBELL_ADDR, is_write=True) == "posted"  # a datamatch miss
    assert table.path(SPACE_MMIO, layout.MMIO_TESTDEV_DOORBELL_ADDR, is_write=False) == "sync"


def test_without_coalescing_the_ranges_go_to_the_device_model_and_doorbells_stay():
    table = machine_routes(kernel_routes("builtin")).without_coalescing()
    assert table.in_kernel(ACTION_COALESCED) == []
    assert table.action(SPACE_MMIO, layout.MMIO_TESTDEV_ADDR) == ACTION_DEVICE
    assert table.path(SPACE_MMIO, layout.MMIO_TESTDEV_ADDR, is_write=True) == "posted"
    assert len(table.in_kernel(ACTION_IOEVENTFD)) == 2


def test_only_an_ioeventfd_range_has_a_datamatch():
    with pytest.raises(ValueError):
        RouteTable([Route(SPACE_PIO, 0x10, 4, ACTION_COALESCED, datamatch=1)])
    assert RouteTable([Route(SPACE_PIO, 0x10, 4, ACTION_IOEVENTFD, datamatch=1)]).pack()
