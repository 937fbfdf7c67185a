"""Split virtqueues: the rings, notification suppression both ways, EVENT_IDX, index wrap-around."""

import pytest

from mpvmm.virtio import spec
from mpvmm.virtio import mmio_registers as registers
from mpvmm.virtio.entropy import Entropy
from mpvmm.virtio.queue import SplitQueue
from tests.virtio.driver import Driver

EVENT_IDX = spec.feature_bit(spec.F_EVENT_IDX)


def counting_source(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


def rng_driver(refuse: int = 0, device=None) -> tuple[Driver, object]:
    driver = Driver(device or Entropy(source=counting_source))
    queue = driver.probe(refuse=refuse, queue_size=16)[0]
    return driver, queue


@pytest.mark.parametrize("refuse", [0, EVENT_IDX])
def test_chains_come_back_in_the_used_ring_with_their_data(refuse):
    driver, queue = rng_driver(refuse)
    heads = [queue.add(in_=[n]) for n in (1, 7, 64)]
    queue.kick()
    assert queue.take_used() == [(head, n) for (head, _), n in zip(heads, (1, 7, 64))]
    for (_, [(address, length)]) in heads:
        assert driver.memory.read(address, length) == counting_source(length)
    stats = driver.transport.queues[0].stats
    assert (stats.notifications, stats.chains, stats.used, stats.bytes_written) == (1, 3, 3, 72)
    assert driver.interrupts == 1 == stats.interrupts


def test_indirect_chains():
    driver, queue = rng_driver()
    head, writable = queue.add(in_=[3, 5], indirect=True)
    queue.kick()
    assert queue.take_used() == [(head, 8)]
    assert [driver.memory.read(a, n) for a, n in writable] == [b"\x00\x01\x02", b"\x03\x04\x05\x06\x07"]


def test_the_ioeventfd_path_counts_as_a_notification_but_not_an_exit():
    driver, queue = rng_driver()
    queue.add(in_=[4])
    queue.kick(via_register=False)
    assert driver.transport.queues[0].stats.notifications == 1
    assert driver.transport.stats.mmio_notifications == 0
    assert driver.device.stats.requests == 1


def test_without_event_idx_the_driver_can_refuse_interrupts():
    driver, queue = rng_driver(refuse=EVENT_IDX)
    queue.set_no_interrupt(True)
    queue.add(in_=[4])
    queue.kick()
    assert len(queue.take_used()) == 1
    assert driver.interrupts == 0
    assert driver.transport.queues[0].stats.interrupts_suppressed == 1
    queue.set_no_interrupt(False)
    queue.add(in_=[4])
    queue.kick()
    assert driver.interrupts == 1


def test_without_event_idx_kicks_are_welcome_when_idle():
    """After draining, the device clears VIRTQ_USED_F_NO_NOTIFY so the next chain is kicked."""
    driver, queue = rng_driver(refuse=EVENT_IDX)
    queue.add(in_=[4])
    queue.kick()
    assert driver.memory.read_u16(queue.used) == 0
    old = queue.avail_idx
    queue.add(in_=[4])
    assert queue.kick(old_avail=old)


def test_event_idx_used_event_delays_the_interrupt():
    """The driver asks for an interrupt only once the used index passes used_event (vring_need_event)."""
    driver, queue = rng_driver()
    queue.set_used_event(2)  # "interrupt me when entry 2 is used", i.e. at the third
    for expected_interrupts in (0, 0, 1):
        queue.add(in_=[1])
        queue.kick()
        assert driver.interrupts == expected_interrupts
    assert len(queue.take_used()) == 3
    assert driver.transport.queues[0].stats.interrupts_suppressed == 2


def test_event_idx_avail_event_says_when_to_kick():
    driver, queue = rng_driver()
    for _ in range(3):
        queue.add(in_=[1])
    queue.kick()
    # The device has consumed 3 chains and asks to hear of the next one.
    assert driver.memory.read_u16(queue.used + 4 + 8 * queue.size) == 3
    old = queue.avail_idx
    queue.add(in_=[1])
    assert queue.kick(old_avail=old)
    assert driver.device.stats.requests == 4


def test_event_idx_batches_need_one_kick_and_one_interrupt():
    driver, queue = rng_driver()
    old = queue.avail_idx
    for _ in range(10):
        queue.add(in_=[2])
    assert queue.kick(old_avail=old)
    assert len(queue.take_used()) == 10
    assert driver.interrupts == 1


class ConcurrentGuest(Entropy):
    """The guest adds a chain while the device is busy with the first (no kick: notifications are off)."""

    driver_queue = None

    def process(self, index):
        completed = super().process(index)
        if self.stats.requests == 1:
            self.driver_queue.add(in_=[4])
        return completed


@pytest.mark.parametrize("refuse", [0, EVENT_IDX])
def test_a_chain_added_while_the_device_works_is_not_lost(refuse):
    device = ConcurrentGuest(source=counting_source)
    driver = Driver(device)
    queue = driver.probe(refuse=refuse, queue_size=16)[0]
    device.driver_queue = queue
    old = queue.avail_idx
    queue.add(in_=[4])
    queue.kick(old_avail=old)
    # The re-check after re-enabling notifications found the second chain.
    assert len(queue.take_used()) == 2
    assert queue.kicks_sent == 1


@pytest.mark.parametrize("refuse", [0, EVENT_IDX])
def test_indexes_wrap_around_at_65536(refuse):
    """A long-lived queue: both sides start at index 65534 and run past the 16-bit wrap."""
    driver, queue = rng_driver(refuse)
    device_queue = driver.transport.queues[0]
    start = 0xFFFE
    queue.avail_idx = queue.last_used = start
    # The state of both sides after 65534 chains (the device's side poked, as running them takes long).
    device_queue.next_avail = device_queue.next_used = device_queue._signalled_used = start
    driver.memory.write_u16(queue.avail + 2, start)
    driver.memory.write_u16(queue.used + 2, start)
    driver.memory.write_u16(queue.used + 4 + 8 * queue.size, start)  # avail_event
    queue.set_used_event(start)
    heads = []
    for _ in range(5):
        old = queue.avail_idx
        heads.append(queue.add(in_=[3])[0])
        queue.kick(old_avail=old)
        if refuse == 0:
            queue.set_used_event(queue.avail_idx)
    assert [head for head, _ in queue.take_used()] == heads
    assert queue.used_idx() == (start + 5) & 0xFFFF == 3
    assert driver.interrupts == 5


def test_the_available_index_may_not_run_ahead_by_more_than_the_queue():
    driver, queue = rng_driver()
    driver.memory.write_u16(queue.avail + 2, 17)  # 17 new chains in a 16-entry queue
    queue.kick()
    assert driver.needs_reset
    assert "past the queue size" in driver.transport.needs_reset_reason


def test_a_bad_chain_needs_a_reset_and_stops_the_queue():
    driver, queue = rng_driver()
    good, _ = queue.add(in_=[4])
    queue.offer(good)  # the same head twice is legal; now a bad one:
    driver.memory.write_u16(queue.avail + 4 + 2 * 2, 99)
    queue.avail_idx += 1
    queue.publish()
    queue.add(in_=[4])
    queue.kick()
    # The two chains before the bad head were served, nothing after it.
    assert driver.device.stats.requests == 2
    assert driver.needs_reset
    assert "head index 99" in driver.transport.needs_reset_reason
    # The driver hears of both: the chains that completed, and the reset the device needs.
    assert driver.take_interrupt() == registers.INTERRUPT_USED_BUFFER | registers.INTERRUPT_CONFIG_CHANGE
    assert len(queue.take_used()) == 2


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_queue_sizes_must_be_powers_of_two(size):
    with pytest.raises(ValueError):
        SplitQueue(size)
