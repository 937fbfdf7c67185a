"""The virtio-mmio transport's registers, driven as Linux's virtio_mmio driver drives them."""

import re

import pytest

from mpvmm.virtio import mmio, spec
from mpvmm.virtio import mmio_registers as registers
from mpvmm.virtio.entropy import Entropy
from tests.virtio.driver import LOW_RAM_SIZE, Driver, RecordingRam, make_ram

VERSION_1 = spec.feature_bit(spec.F_VERSION_1)


def entropy_driver(**kwargs) -> Driver:
    return Driver(Entropy(source=lambda n: bytes(range(256)) * (n // 256 + 1)), **kwargs)


def test_identity_registers():
    driver = entropy_driver()
    assert driver.read(registers.MAGIC_VALUE) == 0x74726976  # "virt"
    assert driver.read(registers.VERSION) == 2
    assert driver.read(registers.DEVICE_ID) == spec.DEVICE_ID_ENTROPY
    assert driver.read(registers.VENDOR_ID) == int.from_bytes(b"MPVM", "little")
    # No shared memory regions: their length reads as -1.
    assert driver.read(registers.SHM_LEN_LOW) == driver.read(registers.SHM_LEN_HIGH) == 0xFFFFFFFF


@pytest.mark.parametrize("offset, size", [(registers.MAGIC_VALUE, 1), (registers.MAGIC_VALUE, 2), (registers.VERSION + 1, 4), (0x0E0, 4)])
def test_control_registers_want_aligned_32_bit_accesses(offset, size):
    driver = entropy_driver()
    assert driver.transport.read(offset, size) == 0
    assert driver.transport.stats.bad_accesses == 1


def test_features_offered_with_the_ring_features_and_version_1():
    driver = entropy_driver()
    offered = driver.negotiate()
    assert offered == VERSION_1 | spec.feature_bit(spec.F_INDIRECT_DESC) | spec.feature_bit(spec.F_EVENT_IDX)
    assert driver.status & spec.STATUS_FEATURES_OK
    assert driver.transport.driver_features == offered


@pytest.mark.parametrize(
    "sel, value",
    [
        (0, 1 << 5),  # a device bit not offered
        (1, 1 << 2),  # VIRTIO_F_RING_PACKED (bit 34): not offered
        (2, 1),  # bit 64: nothing is ever offered there
    ],
)
def test_features_not_offered_are_refused(sel, value):
    driver = entropy_driver()
    driver.negotiate()
    driver.write(registers.STATUS, 0)
    driver.add_status(spec.STATUS_ACKNOWLEDGE)
    driver.add_status(spec.STATUS_DRIVER)
    driver.write(registers.DRIVER_FEATURES_SEL, 1)
    driver.write(registers.DRIVER_FEATURES, 1)  # VERSION_1
    driver.write(registers.DRIVER_FEATURES_SEL, sel)
    driver.write(registers.DRIVER_FEATURES, value | (1 if sel == 1 else 0))
    driver.add_status(spec.STATUS_FEATURES_OK)
    assert not driver.status & spec.STATUS_FEATURES_OK
    assert driver.transport.stats.features_refused == 1


def test_a_driver_without_version_1_is_refused():
    """virtio-mmio version 2 is a 1.x device: a legacy driver cannot have it."""
    driver = entropy_driver()
    driver.negotiate(refuse=VERSION_1)
    assert not driver.status & spec.STATUS_FEATURES_OK
    # And without FEATURES_OK, DRIVER_OK is refused too.
    driver.add_status(spec.STATUS_DRIVER_OK)
    assert not driver.status & spec.STATUS_DRIVER_OK


def test_features_are_final_after_features_ok():
    driver = entropy_driver()
    driver.negotiate()
    driver.write(registers.DRIVER_FEATURES_SEL, 0)
    driver.write(registers.DRIVER_FEATURES, 0)
    assert driver.transport.driver_features & spec.feature_bit(spec.F_EVENT_IDX)


def test_status_steps_cannot_be_skipped_or_undone():
    driver = entropy_driver()
    driver.write(registers.STATUS, spec.STATUS_ACKNOWLEDGE | spec.STATUS_FEATURES_OK)
    assert driver.status == 0  # FEATURES_OK before DRIVER: the write is ignored
    driver.add_status(spec.STATUS_ACKNOWLEDGE)
    driver.add_status(spec.STATUS_DRIVER)
    driver.write(registers.STATUS, spec.STATUS_ACKNOWLEDGE)  # clearing DRIVER
    assert driver.status == spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER
    assert driver.transport.stats.bad_accesses == 2


def test_reset_returns_to_power_on():
    driver = entropy_driver()
    queue = driver.probe()[0]
    queue.add(in_=[16])
    queue.kick()
    assert driver.take_interrupt() == registers.INTERRUPT_USED_BUFFER
    queue.add(in_=[16])
    queue.kick()
    driver.write(registers.STATUS, 0)
    assert driver.status == 0
    assert driver.read(registers.INTERRUPT_STATUS) == 0
    assert driver.transport.driver_features == 0
    driver.write(registers.QUEUE_SEL, 0)
    assert driver.read(registers.QUEUE_READY) == 0
    assert driver.device.memory is None
    assert driver.transport.stats.resets == 2  # the probe's and this one
    # A fresh probe works as the first did.
    queue = driver.probe()[0]
    head, _ = queue.add(in_=[8])
    queue.kick()
    assert queue.take_used() == [(head, 8)]
    assert driver.device.stats.requests == 3


def test_queue_registers():
    driver = entropy_driver()
    driver.write(registers.QUEUE_SEL, 1)
    assert driver.read(registers.QUEUE_NUM_MAX) == 0  # no queue 1
    driver.write(registers.QUEUE_SEL, 0)
    assert driver.read(registers.QUEUE_NUM_MAX) == 64
    driver.write(registers.QUEUE_NUM, 16)  # before FEATURES_OK: ignored
    assert driver.transport.queues[0].size == 64
    driver.negotiate()
    queue = driver.setup_queue(0, 16)
    device_queue = driver.transport.queues[0]
    assert (device_queue.size, device_queue.desc_table, device_queue.used_ring) == (16, queue.desc, queue.used)
    assert driver.read(registers.QUEUE_READY) == 1
    driver.write(registers.QUEUE_NUM, 32)  # while ready: ignored
    driver.write(registers.QUEUE_DESC_HIGH, 1)
    assert (device_queue.size, device_queue.desc_table) == (16, queue.desc)
    driver.write(registers.QUEUE_READY, 0)
    assert driver.read(registers.QUEUE_READY) == 0


def test_64_bit_ring_addresses_are_assembled_from_halves():
    driver = entropy_driver()
    driver.negotiate()
    driver.write(registers.QUEUE_SEL, 0)
    driver.write(registers.QUEUE_DRIVER_LOW, 0x2000)
    driver.write(registers.QUEUE_DRIVER_HIGH, 0x1)
    assert driver.transport.queues[0].avail_ring == 0x1_0000_2000


def bring_up_with(driver, **fields):
    """Negotiate, configure queue 0 as Linux would, then override ``fields`` before QueueReady and DRIVER_OK."""
    driver.negotiate()
    driver.setup_queue(0, 16)
    driver.write(registers.QUEUE_READY, 0)
    for register, value in fields.items():
        driver.write(getattr(registers, register), value)
    driver.write(registers.QUEUE_READY, 1)
    driver.add_status(spec.STATUS_DRIVER_OK)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"QUEUE_NUM": 12}, "not a power of two"),
        ({"QUEUE_NUM": 128}, "not a power of two up to 64"),
        ({"QUEUE_NUM": 0}, "not a power of two"),
        ({"QUEUE_DESC_LOW": 0x1008}, "descriptor table at 0x1008 is not 16-byte aligned"),
        ({"QUEUE_DRIVER_LOW": 0x1001}, "available ring at 0x1001 is not 2-byte aligned"),
        ({"QUEUE_DEVICE_LOW": 0x1002}, "used ring at 0x1002 is not 4-byte aligned"),
        ({"QUEUE_DEVICE_LOW": LOW_RAM_SIZE - 64}, "used ring .* is not guest RAM"),
        ({"QUEUE_DESC_HIGH": 0x10}, "descriptor table .* is not guest RAM"),
    ],
)
def test_a_bad_queue_layout_needs_a_reset(fields, reason):
    buffer, memory = make_ram(RecordingRam)
    driver = entropy_driver(memory=memory, buffer=buffer)
    bring_up_with(driver, **fields)
    assert driver.status & spec.STATUS_DRIVER_OK
    assert driver.needs_reset
    assert driver.transport.needs_reset_reason is not None
    assert re.search(reason, driver.transport.needs_reset_reason)
    # The driver hears of it through a configuration-change interrupt.
    assert driver.interrupts == 1 and driver.take_interrupt() == registers.INTERRUPT_CONFIG_CHANGE
    # And the device leaves guest memory alone until it is reset.
    before = len(memory.accesses)
    driver.write(registers.QUEUE_NOTIFY, 0)
    driver.transport.process_queue(0)
    assert len(memory.accesses) == before
    assert driver.transport.stats.ignored_notifications == 1
    assert driver.device.stats.requests == 0


def test_a_queue_made_ready_after_driver_ok_is_checked_too():
    driver = entropy_driver()
    driver.negotiate()
    driver.add_status(spec.STATUS_DRIVER_OK)
    assert not driver.needs_reset
    driver.write(registers.QUEUE_SEL, 0)
    driver.write(registers.QUEUE_NUM, 3)
    driver.write(registers.QUEUE_READY, 1)
    assert driver.needs_reset


def test_notifications_for_missing_or_idle_queues_are_ignored():
    driver = entropy_driver()
    driver.negotiate()
    driver.write(registers.QUEUE_NOTIFY, 0)  # not DRIVER_OK yet
    driver.write(registers.QUEUE_NOTIFY, 7)  # no such queue
    assert driver.transport.stats.ignored_notifications == 2
    assert driver.transport.stats.mmio_notifications == 2


def test_queue_notify_goes_to_the_callback_when_given():
    _, memory = make_ram()
    seen = []
    transport = mmio.MmioTransport(Entropy(), memory, on_notify=seen.append)
    transport.write(registers.QUEUE_NOTIFY, 4, 0x10000 | 3)  # the upper half is notification data, never offered
    assert seen == [3]


def test_interrupt_status_and_ack():
    driver = entropy_driver()
    queue = driver.probe()[0]
    queue.add(in_=[4])
    queue.kick()
    assert driver.interrupts == 1
    assert driver.read(registers.INTERRUPT_STATUS) == registers.INTERRUPT_USED_BUFFER
    driver.transport.config_changed()
    assert driver.read(registers.INTERRUPT_STATUS) == registers.INTERRUPT_USED_BUFFER | registers.INTERRUPT_CONFIG_CHANGE
    driver.write(registers.INTERRUPT_ACK, registers.INTERRUPT_USED_BUFFER)
    assert driver.read(registers.INTERRUPT_STATUS) == registers.INTERRUPT_CONFIG_CHANGE
    assert driver.read(registers.CONFIG_GENERATION) == 1
    assert driver.transport.stats.interrupts == 2
    assert driver.transport.stats.config_interrupts == 1


def test_an_ack_that_arrives_after_a_new_completion_does_not_clear_it():
    """Linux reads InterruptStatus, then ACKs it; the ACK is a posted write, so a completion can come first.

    Had the late ACK cleared the bit, the interrupt of that completion would
    find InterruptStatus 0, and Linux's handler then skips the rings: the
    request never completes (a mounted ext4 hung this way under Linux).
    """
    driver = entropy_driver()
    queue = driver.probe()[0]
    queue.add(in_=[4])
    queue.kick()
    assert driver.read(registers.INTERRUPT_STATUS) == registers.INTERRUPT_USED_BUFFER  # handler 1 reads
    assert len(queue.take_used()) == 1  # and takes the ring (its ACK, posted, is still on the way)
    queue.set_used_event(queue.last_used)  # interrupts wanted again, as Linux's virtqueue_enable_cb
    queue.add(in_=[4])
    queue.kick()  # completes before handler 1's ACK reaches the device: a second interrupt
    assert driver.interrupts == 2
    driver.write(registers.INTERRUPT_ACK, registers.INTERRUPT_USED_BUFFER)  # handler 1's ACK, late
    assert driver.read(registers.INTERRUPT_STATUS) == registers.INTERRUPT_USED_BUFFER  # handler 2 sees it
    driver.write(registers.INTERRUPT_ACK, registers.INTERRUPT_USED_BUFFER)
    assert driver.read(registers.INTERRUPT_STATUS) == 0


def test_a_failing_trigger_is_counted_not_raised():
    def trigger():
        raise OSError("irqfd gone")

    driver = Driver(Entropy(), trigger=trigger)
    driver.probe()
    transport = driver.transport
    transport.config_changed()
    assert transport.stats.trigger_errors == 1
    assert transport.interrupt_status == registers.INTERRUPT_CONFIG_CHANGE


def test_failed_stops_the_device():
    driver = entropy_driver()
    queue = driver.probe()[0]
    driver.add_status(spec.STATUS_FAILED)
    queue.add(in_=[4])
    queue.kick()
    assert driver.device.stats.requests == 0
    assert not driver.transport.running
    assert not driver.transport.queues[0].attached


def test_config_space_reads():
    class Configured(Entropy):
        def config(self):
            return bytes(range(1, 13))

    driver = Driver(Configured())
    transport = driver.transport
    assert transport.read(registers.CONFIG, 1) == 1
    assert transport.read(registers.CONFIG + 2, 2) == 0x0403
    assert transport.read(registers.CONFIG + 4, 4) == 0x08070605
    assert transport.read(registers.CONFIG + 4, 8) == 0x0C0B0A0908070605
    assert transport.read(registers.CONFIG + 12, 1) == 0  # past the config space
    assert transport.read(registers.CONFIG + 10, 4) == 0  # half past it
    assert transport.read(registers.CONFIG, 3) == 0
    assert transport.stats.bad_accesses == 3
    transport.write(registers.CONFIG, 4, 0xFFFFFFFF)  # nothing writable: ignored
    assert transport.read(registers.CONFIG, 1) == 1
