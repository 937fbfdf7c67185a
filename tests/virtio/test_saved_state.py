"""A device's saved state: captured mid-use, restored over a copy of guest RAM, and the driver goes on.

The copy stands for what a snapshot restores: the same bytes of RAM in a new
buffer, a new device and transport, the record in between (through msgpack,
as a snapshot file holds it). Bad records are refused before anything is
applied.
"""

import copy

import msgpack
import pytest

from mpvmm.errors import StateError
from mpvmm.virtio import block, saved_state, spec
from mpvmm.virtio.block import Block
from mpvmm.virtio.console import Console
from mpvmm.virtio.entropy import Entropy
from mpvmm.virtio.memory import GuestRam
from mpvmm.virtio.mmio import MmioTransport
from tests.virtio.blk_driver import BlockGuest
from tests.virtio.driver import REGIONS, Driver

SECTOR = 512


def _move(driver: Driver, device) -> MmioTransport:
    """Capture ``driver``'s device, restore it as ``device`` over a copy of its RAM; the driver now uses that."""
    record = msgpack.unpackb(msgpack.packb(saved_state.capture(driver.transport)), raw=False)
    buffer = bytearray(driver.buffer)
    memory = GuestRam(buffer, REGIONS)
    transport = MmioTransport(device, memory, trigger=driver._trigger)
    saved_state.restore(transport, record)
    driver.buffer, driver.memory, driver.transport, driver.device = buffer, memory, transport, device
    return transport


def test_a_disk_goes_on_where_it_was(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * SECTOR))
    with open(path, "r+b") as first:
        guest = BlockGuest(Block(first))
        assert guest.write(2, b"before the snapshot".ljust(SECTOR, b"\0")) == block.S_OK
        used_before = guest.queues[0].used_idx()
        with open(path, "r+b") as second:
            transport = _move(guest.driver, Block(second))
            assert transport.running and transport.status == guest.driver.status
            status, data, _ = guest.read(2, SECTOR)  # the same ring, its indexes carried on
            assert status == block.S_OK and data.startswith(b"before the snapshot")
            assert guest.write(3, b"after".ljust(SECTOR, b"\0")) == block.S_OK
            assert guest.queues[0].used_idx() == used_before + 2
    assert path.read_bytes()[3 * SECTOR:3 * SECTOR + 5] == b"after"


def test_chains_offered_before_the_snapshot_are_served_after_it(tmp_path):
    device = Entropy(source=lambda n: b"\x07" * n)
    driver = Driver(device)
    queue = driver.probe()[0]
    head, [(address, _)] = queue.add(in_=[16])  # offered, not kicked: the kick is lost with the old process
    transport = _move(driver, Entropy(source=lambda n: b"\x09" * n))
    transport.process_queue(0)  # what the restored device process does once for every ready queue
    assert queue.take_used() == [(head, 16)]
    assert driver.memory.read(address, 16) == b"\x09" * 16


def test_console_input_waiting_survives():
    driver = Driver(Console())
    driver.probe()
    driver.device.enqueue_input(b"typed")
    restored = Console()
    _move(driver, restored)
    assert restored.pending_input == 5


def test_an_unconfigured_device_stays_unconfigured():
    driver = Driver(Entropy())
    transport = _move(driver, Entropy())
    assert transport.status == 0 and not transport.queues[0].attached


def _record(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(64 * SECTOR))
    guest = BlockGuest(Block(open(path, "r+b")))
    return path, guest, saved_state.capture(guest.driver.transport)


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.update(version=2), "version"),
    (lambda r: r.update(device_id=spec.DEVICE_ID_ENTROPY), "device type"),
    (lambda r: r.update(status=-1), "status"),
    (lambda r: r.update(driver_features="all"), "driver_features"),
    (lambda r: r.update(queues=[]), "queues"),
    (lambda r: r["queues"][0].update(size=1 << 20), "size"),
    (lambda r: r["queues"][0].update(ready=1), "ready"),
    (lambda r: r["queues"][0].update(used_ring=1 << 40), "not guest RAM"),
    (lambda r: r["queues"][0].update(desc_table=0x1001), "aligned"),
    (lambda r: r.update(device={"sectors": 128, "read_only": False}), "sectors"),
    (lambda r: r.update(device={"sectors": 64, "read_only": True}), "read-only"),
    (lambda r: r.update(needs_reset_reason=7), "reason"),
])
def test_bad_records_are_refused_before_anything_changes(tmp_path, damage, message):
    path, guest, record = _record(tmp_path)
    bad = copy.deepcopy(record)
    damage(bad)
    buffer = bytearray(guest.driver.buffer)
    transport = MmioTransport(Block(open(path, "r+b")), GuestRam(buffer, REGIONS))
    with pytest.raises(StateError, match=message):
        saved_state.restore(transport, bad)
    assert transport.status == 0 and not transport.queues[0].attached
