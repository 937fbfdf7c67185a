"""A virtio driver in the test's hands: it does what Linux's virtio_mmio and virtio_ring do.

Guest RAM is a bytearray laid out like a PC's: a low region from 0 and a
high one above the MMIO hole at 4 GiB, so a buffer can straddle the hole.
The driver probes the device through its registers, builds descriptor
tables and available rings in that RAM, kicks, and reads the used ring back.
"""

from __future__ import annotations

import struct

from mpvmm.virtio import mmio, spec
from mpvmm.virtio import mmio_registers as registers
from mpvmm.virtio.memory import GuestRam
from mpvmm.x86 import layout

LOW_RAM_SIZE = 1 << 20
HIGH_RAM_SIZE = 256 << 10
HIGH_RAM_ADDR = layout.MMIO_HOLE_END  # the second region starts past the hole, as on a PC
REGIONS = [(0, LOW_RAM_SIZE, 0), (HIGH_RAM_ADDR, HIGH_RAM_SIZE, LOW_RAM_SIZE)]
# Rings and tables sit low; data buffers go where each test puts them.
RING_AREA = 0x1000
DATA_AREA = 0x40000
# Fresh device-writable buffers are filled with this, so a write by the device shows.
POISON = 0xA5


def make_ram(cls=GuestRam) -> tuple[bytearray, GuestRam]:
    buffer = bytearray(LOW_RAM_SIZE + HIGH_RAM_SIZE)
    return buffer, cls(buffer, REGIONS)


class Allocator:
    """A bump allocator over a range of guest addresses."""

    def __init__(self, start: int, end: int):
        self.next, self.end = start, end

    def take(self, size: int, align: int = 16) -> int:
        address = -(-self.next // align) * align
        if address + size > self.end:
            raise MemoryError("test allocator exhausted")
        self.next = address + size
        return address


class DriverQueue:
    """One virtqueue as Linux's virtio_ring keeps it."""

    def __init__(self, driver: Driver, index: int, size: int):
        self.driver, self.index, self.size = driver, index, size
        memory, rings = driver.memory, driver.rings
        self.desc = rings.take(spec.descriptor_table_size(size), 16)
        self.avail = rings.take(spec.avail_ring_size(size), 2)
        self.used = rings.take(spec.used_ring_size(size), 4)
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}  # head -> its ring descriptors, to free them
        self.avail_idx = 0
        self.last_used = 0
        self.kicks_sent = 0
        self.kicks_skipped = 0
        memory.write(self.avail, bytes(spec.avail_ring_size(size)))
        memory.write(self.used, bytes(spec.used_ring_size(size)))

    # --- Buffers. ---

    def _buffers(self, out, in_) -> list[tuple[int, int, int]]:
        """(address, length, flags) for out items (bytes or (addr, len)) and in items (length or (addr, len))."""
        memory, data = self.driver.memory, self.driver.data
        descriptors = []
        for item in out:
            if isinstance(item, (bytes, bytearray)):
                address = data.take(max(len(item), 1), 8)
                memory.write(address, bytes(item))
                item = (address, len(item))
            descriptors.append((item[0], item[1], 0))
        for item in in_:
            if isinstance(item, int):
                address = data.take(max(item, 1), 8)
                memory.write(address, bytes([POISON]) * item)
                item = (address, item)
            descriptors.append((item[0], item[1], spec.VIRTQ_DESC_F_WRITE))
        return descriptors

    def add(self, out=(), in_=(), indirect: bool = False, publish: bool = True) -> tuple[int, list[tuple[int, int]]]:
        """Offer a chain; returns its head and the (address, length) of its device-writable buffers."""
        memory = self.driver.memory
        descriptors = self._buffers(out, in_)
        writable = [(a, n) for a, n, f in descriptors if f & spec.VIRTQ_DESC_F_WRITE]
        if indirect:
            table = self.driver.data.take(spec.DESCRIPTOR_SIZE * len(descriptors), 16)
            for i, (address, length, flags) in enumerate(descriptors):
                last = i == len(descriptors) - 1
                flags |= 0 if last else spec.VIRTQ_DESC_F_NEXT
                write_descriptor(memory, table + 16 * i, address, length, flags, 0 if last else i + 1)
            descriptors = [(table, spec.DESCRIPTOR_SIZE * len(descriptors), spec.VIRTQ_DESC_F_INDIRECT)]
        indexes = [self.free.pop(0) for _ in descriptors]
        for i, (address, length, flags) in enumerate(descriptors):
            last = i == len(descriptors) - 1
            flags |= 0 if last else spec.VIRTQ_DESC_F_NEXT
            write_descriptor(memory, self.desc + 16 * indexes[i], address, length, flags, 0 if last else indexes[i + 1])
        self.chains[indexes[0]] = indexes
        self.offer(indexes[0], publish)
        return indexes[0], writable

    def offer(self, head: int, publish: bool = True) -> None:
        """Put ``head`` in the available ring (and, with ``publish``, move avail.idx past it)."""
        memory = self.driver.memory
        memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self.driver.memory.write_u16(self.avail + 2, self.avail_idx)

    # --- Notifications, as virtqueue_kick_prepare decides them. ---

    def kick(self, old_avail: int | None = None, via_register: bool = True) -> bool:
        """Notify the device if it asked for it; returns whether a kick was sent."""
        memory = self.driver.memory
        if old_avail is not None:
            if self.driver.event_idx:
                avail_event = memory.read_u16(self.used + 4 + 8 * self.size)
                wanted = spec.vring_need_event(avail_event, self.avail_idx, old_avail)
            else:
                wanted = not memory.read_u16(self.used) & spec.VIRTQ_USED_F_NO_NOTIFY
            if not wanted:
                self.kicks_skipped += 1
                return False
        self.kicks_sent += 1
        if via_register:
            self.driver.write(registers.QUEUE_NOTIFY, self.index)
        else:
            self.driver.transport.notify(self.index)
        return True

    def set_used_event(self, value: int) -> None:
        self.driver.memory.write_u16(self.avail + 4 + 2 * self.size, value)

    def set_no_interrupt(self, suppressed: bool) -> None:
        self.driver.memory.write_u16(self.avail, spec.VIRTQ_AVAIL_F_NO_INTERRUPT if suppressed else 0)

    def used_idx(self) -> int:
        return self.driver.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New used entries (id, len) since the last call; their descriptors go back on the free list."""
        memory = self.driver.memory
        entries = []
        while self.last_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", memory.read(slot, 8))
            entries.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return entries


def write_descriptor(memory: GuestRam, address: int, buffer: int, length: int, flags: int, next_index: int) -> None:
    memory.write(address, struct.pack("<QIHH", buffer, length, flags, next_index))


class Driver:
    """The driver side of one virtio-mmio device: probes it, owns its queues, takes its interrupts."""

    def __init__(self, device, memory: GuestRam | None = None, buffer: bytearray | None = None, trigger=None):
        if memory is None:
            buffer, memory = make_ram()
        self.buffer, self.memory = buffer, memory
        self.interrupts = 0
        self._also_trigger = trigger  # what the irqfd write does, if the test wants it to do something
        self.transport = mmio.MmioTransport(device, memory, trigger=self._trigger)
        self.device = device
        self.rings = Allocator(RING_AREA, DATA_AREA)
        self.data = Allocator(DATA_AREA, LOW_RAM_SIZE)
        self.high_data = Allocator(HIGH_RAM_ADDR, HIGH_RAM_ADDR + HIGH_RAM_SIZE)
        self.queues: list[DriverQueue] = []
        self.features = 0

    def _trigger(self) -> None:
        self.interrupts += 1
        if self._also_trigger:
            self._also_trigger()

    def read(self, offset: int) -> int:
        return self.transport.read(offset, 4)

    def write(self, offset: int, value: int) -> None:
        self.transport.write(offset, 4, value)

    @property
    def status(self) -> int:
        return self.read(registers.STATUS)

    @property
    def event_idx(self) -> bool:
        return bool(self.features & spec.feature_bit(spec.F_EVENT_IDX))

    def add_status(self, bit: int) -> None:
        self.write(registers.STATUS, self.status | bit)

    def negotiate(self, refuse: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept every offered feature but ``refuse``; FEATURES_OK read back."""
        assert self.read(registers.MAGIC_VALUE) == 0x74726976 and self.read(registers.VERSION) == 2
        self.write(registers.STATUS, 0)
        self.add_status(spec.STATUS_ACKNOWLEDGE)
        self.add_status(spec.STATUS_DRIVER)
        offered = 0
        for word in (0, 1):
            self.write(registers.DEVICE_FEATURES_SEL, word)
            offered |= self.read(registers.DEVICE_FEATURES) << (32 * word)
        self.features = offered & ~refuse
        for word in (0, 1):
            self.write(registers.DRIVER_FEATURES_SEL, word)
            self.write(registers.DRIVER_FEATURES, (self.features >> (32 * word)) & 0xFFFFFFFF)
        self.add_status(spec.STATUS_FEATURES_OK)
        return offered

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """vm_setup_vq: select, check not ready, size, ring addresses, ready."""
        self.write(registers.QUEUE_SEL, index)
        assert self.read(registers.QUEUE_READY) == 0
        size = size or self.read(registers.QUEUE_NUM_MAX)
        queue = DriverQueue(self, index, size)
        self.write(registers.QUEUE_NUM, size)
        for low, address in ((registers.QUEUE_DESC_LOW, queue.desc), (registers.QUEUE_DRIVER_LOW, queue.avail),
                             (registers.QUEUE_DEVICE_LOW, queue.used)):  # fmt: skip
            self.write(low, address & 0xFFFFFFFF)
            self.write(low + 4, address >> 32)
        self.write(registers.QUEUE_READY, 1)
        return queue

    def probe(self, refuse: int = 0, queue_size: int | None = None) -> list[DriverQueue]:
        """The whole bring-up Linux does: negotiate, set up every queue, DRIVER_OK."""
        self.negotiate(refuse)
        assert self.status & spec.STATUS_FEATURES_OK, "device refused the features"
        self.queues = [self.setup_queue(i, queue_size) for i in range(len(self.device.queue_sizes))]
        self.add_status(spec.STATUS_DRIVER_OK)
        return self.queues

    def take_interrupt(self) -> int:
        """vm_interrupt: read the reason, acknowledge it."""
        reason = self.read(registers.INTERRUPT_STATUS)
        self.write(registers.INTERRUPT_ACK, reason)
        return reason

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & spec.STATUS_DEVICE_NEEDS_RESET)


class RecordingRam(GuestRam):
    """Guest RAM that records every access the core attempts, in RAM or not."""

    def __init__(self, buffer, regions):
        super().__init__(buffer, regions)
        self.accesses: list[tuple[int, int, bool]] = []
        self.outside: list[tuple[int, int, bool]] = []

    def _pieces(self, address, length, writing):
        self.accesses.append((address, length, writing))
        if not self.contains(address, length):
            self.outside.append((address, length, writing))
        return super()._pieces(address, length, writing)

    def writes(self) -> list[tuple[int, int]]:
        return [(a, n) for a, n, writing in self.accesses if writing and n]
