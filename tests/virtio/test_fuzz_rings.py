"""Hypothesis over real virtqueue memory: whatever a guest writes, the device stays inside RAM and alive.

Each example brings a device up as Linux would, then fills its descriptor
table, an indirect table, the available ring and the buffers with drawn
values (biased to the edges of the RAM regions, the hole, huge lengths,
every flag combination, out-of-range indexes) and kicks. Through an
instrumented ``GuestRam`` it checks that no access even tried to leave RAM,
that every write landed in a used ring or a buffer some descriptor marked
device-writable, and that, unless the device declared DEVICE_NEEDS_RESET,
every chain offered completed.
"""

import struct
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mpvmm.virtio import block, console, mmio, spec
from mpvmm.virtio import mmio_registers as registers
from mpvmm.virtio.block import Block
from mpvmm.virtio.console import Console
from mpvmm.virtio.entropy import Entropy
from mpvmm.x86 import layout
from tests.virtio.driver import DATA_AREA, HIGH_RAM_ADDR, HIGH_RAM_SIZE, LOW_RAM_SIZE, Driver, RecordingRam, make_ram

SIZE = 8  # small queues, so drawn indexes often hit real descriptors
INDIRECT_AREA = DATA_AREA + 0x8000
HEADER_SLOTS = 8  # block headers drawn into DATA_AREA + 0x100 * i
DISK_SECTORS = 64
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

EDGES = [
    0,
    DATA_AREA,
    INDIRECT_AREA,
    LOW_RAM_SIZE - 16,
    LOW_RAM_SIZE - 1,
    LOW_RAM_SIZE,  # the hole
    LOW_RAM_SIZE + 0x1000,
    HIGH_RAM_ADDR - 8,
    HIGH_RAM_ADDR,
    HIGH_RAM_ADDR + HIGH_RAM_SIZE - 16,
    HIGH_RAM_ADDR + HIGH_RAM_SIZE,  # past the end
    layout.MMIO_HOLE_START,
    2**63,
    2**64 - 16,
]
# Half the examples draw only plausible values, so that chains often are good
# and run through the device; the rest mix in the wild ones that hit every check.
HEADER_ADDRESSES = [DATA_AREA + 0x100 * i for i in range(HEADER_SLOTS)]
ram_addresses = st.one_of(
    st.sampled_from(HEADER_ADDRESSES),
    st.integers(DATA_AREA, DATA_AREA + 0x1000),
    st.integers(HIGH_RAM_ADDR, HIGH_RAM_ADDR + 0x1000),
)
addresses = st.one_of(ram_addresses, st.sampled_from(EDGES), st.integers(0, 2**64 - 1))
lengths = st.one_of(
    st.integers(0, 600),
    st.sampled_from([0, 1, 15, 16, 17, 32, 48, 96, 512, 513, 4096]),
    st.sampled_from([2**31, 2**32 - 1, LOW_RAM_SIZE]),
    st.integers(0, 2**32 - 1),
)
NEXT, WRITE = spec.VIRTQ_DESC_F_NEXT, spec.VIRTQ_DESC_F_WRITE
plausible_flags = st.sampled_from([0, NEXT, WRITE, NEXT | WRITE])
flags = st.one_of(plausible_flags, st.integers(0, 7), st.integers(0, 0xFFFF))
small_indexes = st.integers(0, SIZE - 1)
indexes = st.one_of(small_indexes, st.integers(0, SIZE + 1), st.integers(0, 0xFFFF))
plausible_descriptor = st.tuples(ram_addresses, st.integers(0, 600), plausible_flags, small_indexes)
descriptor = st.one_of(plausible_descriptor, plausible_descriptor, st.tuples(addresses, lengths, flags, indexes))
tables = st.one_of(
    st.lists(plausible_descriptor, min_size=SIZE, max_size=SIZE), st.lists(descriptor, min_size=SIZE, max_size=SIZE)
)
heads = st.one_of(
    st.lists(small_indexes, min_size=SIZE, max_size=SIZE), st.lists(indexes, min_size=SIZE, max_size=SIZE)
)
offered_counts = st.one_of(st.integers(0, SIZE), st.integers(1, SIZE), st.integers(0, 0xFFFF))
block_header = st.tuples(
    st.sampled_from([block.T_IN, block.T_OUT, block.T_FLUSH, block.T_GET_ID, block.T_DISCARD, block.T_WRITE_ZEROES, 99]),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, DISK_SECTORS), st.sampled_from([2**64 - 1]), st.integers(0, 2**64 - 1)),
)


@st.composite
def guest_rings(draw):
    """What a guest may have written into one queue's memory."""
    return {
        "table": draw(tables),
        "indirect": draw(st.lists(descriptor, max_size=6)),
        "offered": draw(offered_counts),
        "heads": draw(heads),
        "avail_flags": draw(st.integers(0, 3)),
        "used_event": draw(st.integers(0, 0xFFFF)),
        "headers": draw(st.lists(block_header, min_size=HEADER_SLOTS, max_size=HEADER_SLOTS)),
        "event_idx": draw(st.booleans()),
        "kicks": draw(st.integers(1, 3)),
    }


def write_rings(memory, queue, rings):
    for i, entry in enumerate(rings["table"]):
        memory.write(queue.desc + 16 * i, struct.pack("<QIHH", *entry))
    for i, entry in enumerate(rings["indirect"]):
        memory.write(INDIRECT_AREA + 16 * i, struct.pack("<QIHH", *entry))
    for i, head in enumerate(rings["heads"]):
        memory.write_u16(queue.avail + 4 + 2 * i, head)
    memory.write_u16(queue.avail, rings["avail_flags"])
    memory.write_u16(queue.avail + 4 + 2 * SIZE, rings["used_event"])
    memory.write_u16(queue.avail + 2, rings["offered"])


def writable_ranges(rings):
    """Every range a descriptor marks device-writable: the only buffers the device may write."""
    return [(a, a + n) for a, n, f, _ in rings["table"] + rings["indirect"] if f & spec.VIRTQ_DESC_F_WRITE]


def run_guest(device, rings, after_kicks=None):
    buffer, memory = make_ram(RecordingRam)
    driver = Driver(device, memory=memory, buffer=buffer)
    queues = driver.probe(refuse=0 if rings["event_idx"] else spec.feature_bit(spec.F_EVENT_IDX), queue_size=SIZE)
    for i, header in enumerate(rings["headers"]):
        memory.write(DATA_AREA + 0x100 * i, struct.pack("<IIQ", *header))
    for queue in queues:
        write_rings(memory, queue, rings)
    memory.accesses.clear()
    for _ in range(rings["kicks"]):
        for queue in queues:
            driver.write(registers.QUEUE_NOTIFY, queue.index)
    if after_kicks:
        after_kicks(driver)

    assert memory.outside == [], "an access tried to leave guest RAM"
    allowed = writable_ranges(rings) + [(q.used, q.used + spec.used_ring_size(SIZE)) for q in queues]
    for address, length in memory.writes():
        assert any(low <= address and address + length <= high for low, high in allowed), (address, length)
    for queue, device_queue in zip(queues, driver.transport.queues):
        # The used ring holds exactly what the device says it used, each id a real head.
        assert queue.used_idx() == device_queue.stats.used & 0xFFFF
        assert all(head < SIZE for head, _ in queue.take_used())
    return driver


def all_completed_or_reset(driver, rings, queues=None):
    """Good chains still complete: without DEVICE_NEEDS_RESET, every chain offered was used."""
    event(f"needs reset: {driver.needs_reset}")
    used = sum(q.stats.used for q in driver.transport.queues)
    event(f"chains used: {min(used, 3)}{'+' if used >= 3 else ''}")
    if driver.needs_reset:
        assert driver.transport.needs_reset_reason
        return
    for index in queues if queues is not None else range(len(driver.transport.queues)):
        assert driver.transport.queues[index].stats.used == rings["offered"]


@FUZZ
@given(guest_rings())
def test_entropy_survives_any_ring(rings):
    driver = run_guest(Entropy(source=bytes), rings)
    all_completed_or_reset(driver, rings)


@FUZZ
@given(guest_rings())
def test_block_survives_any_ring(rings):
    with tempfile.TemporaryFile() as disk:
        disk.truncate(DISK_SECTORS * 512)
        device = Block(disk)
        driver = run_guest(device, rings)
        all_completed_or_reset(driver, rings)
        assert disk.seek(0, 2) == DISK_SECTORS * 512  # nothing wrote past the disk


@FUZZ
@given(guest_rings(), st.binary(max_size=64))
def test_console_survives_any_ring(rings, typed):
    def type_input(driver):
        driver.device.enqueue_input(typed)
        driver.transport.process_queue(console.RECEIVE_QUEUE)

    driver = run_guest(Console(out=lambda data: None), rings, after_kicks=type_input)
    # Receive chains are only taken while input waits, so only transmitq must be drained.
    all_completed_or_reset(driver, rings, queues=[console.TRANSMIT_QUEUE])


register_offsets = st.sampled_from(
    [getattr(registers, name) for name in dir(registers) if name.isupper() and getattr(registers, name) < 0x100]
    + [registers.CONFIG + i for i in range(0, 16)]
)
accesses = st.lists(
    st.tuples(
        st.booleans(),
        st.one_of(register_offsets, st.integers(0, registers.WINDOW_SIZE - 1)),
        st.sampled_from([1, 2, 4, 8]),
        st.one_of(st.sampled_from([0, 1, 2, 3, 0xB, 0xF, 0x4F, 0x80, DATA_AREA, LOW_RAM_SIZE - 8]), st.integers(0, 2**32 - 1)),
    ),
    max_size=60,
)


@FUZZ
@given(accesses)
def test_any_register_sequence_keeps_the_transport_sane(sequence):
    """Random register reads and writes (random queue sizes and ring addresses, random status) never break it."""
    buffer, memory = make_ram(RecordingRam)
    transport = mmio.MmioTransport(Entropy(source=bytes), memory)
    for is_write, offset, size, value in sequence:
        if is_write:
            transport.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= transport.read(offset, size) < 1 << (8 * size)
        status = transport.status
        # DRIVER_OK only ever follows FEATURES_OK, which only follows DRIVER, and VERSION_1 was accepted.
        if status & spec.STATUS_DRIVER_OK:
            assert status & spec.STATUS_FEATURES_OK
        if status & spec.STATUS_FEATURES_OK:
            assert status & spec.STATUS_DRIVER and transport.driver_features & spec.feature_bit(spec.F_VERSION_1)
            assert transport.driver_features & ~transport.offered_features() == 0
        for queue in transport.queues:
            assert not queue.attached or transport.running
    assert memory.outside == []
