"""The virtio-mmio transport, version 2 (spec 4.2), as a pure register state machine.

``read(offset, size)`` and ``write(offset, size, value)`` take offsets into
the device's MMIO window, as the device model's bus hands them out. The
transport owns the device status, feature negotiation, the queue registers,
the interrupt status and the configuration generation; chains are the
device's business. Side effects leave only through what it is given:

- ``trigger()`` raises the device's interrupt (an irqfd write in a device
  process); InterruptStatus says why, the driver acknowledges through
  InterruptACK;
- a QueueNotify write calls ``on_notify(index)`` if given (a process may
  forward it to the thread that serves queues), otherwise ``notify(index)``
  serves the queue at once. With an ioeventfd on QueueNotify the guest's kick
  never reaches ``write``: the process calls ``notify(index)`` itself.

Status follows spec 2.1 and 3.1: bits are added one step at a time
(ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), FEATURES_OK is refused for
features we did not offer or without VIRTIO_F_VERSION_1, writing 0 resets,
and any broken rule of the queues (``VirtqueueError``, ``GuestMemoryError``)
sets DEVICE_NEEDS_RESET: from then on the device touches no guest memory
until the driver resets it, and the driver hears of it through a
configuration-change interrupt.

Not thread-safe: one thread owns a transport and its device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from mpvmm.virtio import mmio_registers as registers
from mpvmm.virtio import spec
from mpvmm.virtio.device import VirtioDevice
from mpvmm.virtio.faults import GuestMemoryError, VirtqueueError
from mpvmm.virtio.memory import GuestRam
from mpvmm.virtio.queue import SplitQueue

# Offered by every device on top of its own bits.
TRANSPORT_FEATURES = (
    spec.feature_bit(spec.F_VERSION_1) | spec.feature_bit(spec.F_INDIRECT_DESC) | spec.feature_bit(spec.F_EVENT_IDX)
)
_ALL_ONES = 0xFFFFFFFF
_DRIVER_STATUS_BITS = spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER | spec.STATUS_FEATURES_OK | spec.STATUS_DRIVER_OK
# Each status bit the driver may add, in order, with the bit that must precede it.
_STATUS_STEPS = (
    (spec.STATUS_ACKNOWLEDGE, 0),
    (spec.STATUS_DRIVER, spec.STATUS_ACKNOWLEDGE),
    (spec.STATUS_FEATURES_OK, spec.STATUS_DRIVER),
    (spec.STATUS_DRIVER_OK, spec.STATUS_FEATURES_OK),
)


# The 64-bit ring addresses, written as two 32-bit halves: (SplitQueue attribute, shift).
_RING_ADDRESS_HALVES = {
    registers.QUEUE_DESC_LOW: ("desc_table", 0),
    registers.QUEUE_DESC_HIGH: ("desc_table", 32),
    registers.QUEUE_DRIVER_LOW: ("avail_ring", 0),
    registers.QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    registers.QUEUE_DEVICE_LOW: ("used_ring", 0),
    registers.QUEUE_DEVICE_HIGH: ("used_ring", 32),
}
# Registers that read as a constant.
_CONSTANT_REGISTERS = {
    registers.MAGIC_VALUE: registers.MAGIC,
    registers.VERSION: registers.MMIO_VERSION,
    registers.VENDOR_ID: registers.VENDOR,
    registers.SHM_LEN_LOW: _ALL_ONES,
    registers.SHM_LEN_HIGH: _ALL_ONES,
    registers.SHM_BASE_LOW: _ALL_ONES,
    registers.SHM_BASE_HIGH: _ALL_ONES,
}


@dataclass
class TransportStats:
    """Plain counters of one transport; the owner turns them into metrics."""

    register_reads: int = 0
    register_writes: int = 0
    bad_accesses: int = 0  # wrong width, unknown register, or a write the current state forbids
    mmio_notifications: int = 0  # QueueNotify writes that reached us (no ioeventfd took them)
    ignored_notifications: int = 0  # for a queue that does not exist or is not running
    interrupts: int = 0  # trigger() calls
    config_interrupts: int = 0  # of which for a configuration change
    trigger_errors: int = 0  # trigger() calls that raised OSError
    features_refused: int = 0  # FEATURES_OK writes refused
    resets: int = 0  # resets by the driver (Status written 0)
    needs_reset: int = 0  # times the device entered DEVICE_NEEDS_RESET

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _no_trigger() -> None:
    pass


class MmioTransport:
    """The virtio-mmio window of one ``device`` over guest RAM ``memory``."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestRam,
        trigger: Callable[[], None] | None = None,
        on_notify: Callable[[int], None] | None = None,
    ):
        self.device = device
        self.memory = memory
        self._trigger = trigger or _no_trigger
        self._on_notify = on_notify
        self.queues = [SplitQueue(size) for size in device.queue_sizes]
        self.stats = TransportStats()
        self.config_generation = 0
        self._clear()

    def _clear(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.interrupt_status = 0
        self._raised_since_read = 0  # InterruptStatus bits raised after the driver last read it
        self.needs_reset_reason: str | None = None
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._unofferable_features = False  # a bit above 63 accepted: never valid
        self._queue_sel = 0
        for queue in self.queues:
            queue.reset()

    def offered_features(self) -> int:
        return self.device.device_features() | TRANSPORT_FEATURES

    @property
    def running(self) -> bool:
        """DRIVER_OK and nothing since that stops the device."""
        stopped = spec.STATUS_DEVICE_NEEDS_RESET | spec.STATUS_FAILED
        return bool(self.status & spec.STATUS_DRIVER_OK) and not self.status & stopped

    # --- Register reads. ---

    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` into the window."""
        self.stats.register_reads += 1
        if offset >= registers.CONFIG:
            return self._read_config(offset - registers.CONFIG, size)
        if size != 4 or offset % 4:
            self.stats.bad_accesses += 1
            return 0
        if offset == registers.DEVICE_FEATURES:
            return (self.offered_features() >> (32 * self._device_features_sel)) & _ALL_ONES
        if offset == registers.QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue else 0
        if offset == registers.QUEUE_READY:
            queue = self._selected_queue()
            return int(bool(queue and queue.ready))
        if offset == registers.INTERRUPT_STATUS:
            self._raised_since_read = 0
            return self.interrupt_status
        if offset == registers.STATUS:
            return self.status
        if offset == registers.CONFIG_GENERATION:
            return self.config_generation
        if offset == registers.DEVICE_ID:
            return self.device.device_id
        if offset in _CONSTANT_REGISTERS:
            return _CONSTANT_REGISTERS[offset]
        self.stats.bad_accesses += 1  # write-only or no register: reads as 0
        return 0

    def _read_config(self, offset: int, size: int) -> int:
        data = self.device.config()[offset : offset + size]
        if size not in (1, 2, 4, 8) or len(data) < size:
            self.stats.bad_accesses += 1
            return 0
        return int.from_bytes(data, "little")

    def _selected_queue(self) -> SplitQueue | None:
        return self.queues[self._queue_sel] if self._queue_sel < len(self.queues) else None

    # --- Register writes. ---

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset`` into the window."""
        self.stats.register_writes += 1
        if offset >= registers.CONFIG:
            self.device.write_config(offset - registers.CONFIG, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            return
        if size != 4 or offset % 4:
            self.stats.bad_accesses += 1
            return
        value &= _ALL_ONES
        if offset == registers.STATUS:
            self._write_status(value)
        elif offset == registers.QUEUE_NOTIFY:
            self.stats.mmio_notifications += 1
            (self._on_notify or self.notify)(value & 0xFFFF)
        elif offset == registers.INTERRUPT_ACK:
            # The ACK may arrive after we raised the bit again: a write is posted (the vCPU
            # went on before it reached us). Clearing that new event would make the handler
            # its interrupt runs read 0 and skip the rings: a completion lost for good.
            self.interrupt_status &= ~(value & ~self._raised_since_read)
        elif offset == registers.DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == registers.DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == registers.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == registers.QUEUE_SEL:
            self._queue_sel = value
        elif offset == registers.QUEUE_READY:
            self._write_queue_ready(value & 1)
        elif not self._write_queue_field(offset, value):
            self.stats.bad_accesses += 1

    def _write_driver_features(self, value: int) -> None:
        # Features are final once FEATURES_OK is set (spec 3.1.1).
        if self.status & spec.STATUS_FEATURES_OK or not self.status & spec.STATUS_DRIVER:
            self.stats.bad_accesses += 1
        elif self._driver_features_sel > 1:
            self._unofferable_features |= value != 0
        else:
            shift = 32 * self._driver_features_sel
            self.driver_features = (self.driver_features & ~(_ALL_ONES << shift)) | (value << shift)

    def _configurable_queue(self) -> SplitQueue | None:
        """The selected queue, if the driver may configure it now (features final, queue not in use)."""
        queue = self._selected_queue()
        stopped = spec.STATUS_DEVICE_NEEDS_RESET | spec.STATUS_FAILED
        if queue is None or queue.ready or self.status & stopped or not self.status & spec.STATUS_FEATURES_OK:
            return None
        return queue

    def _write_queue_field(self, offset: int, value: int) -> bool:
        queue = self._configurable_queue()
        if queue is None or (offset not in _RING_ADDRESS_HALVES and offset != registers.QUEUE_NUM):
            return False
        if offset == registers.QUEUE_NUM:
            queue.size = value
            return True
        name, shift = _RING_ADDRESS_HALVES[offset]
        setattr(queue, name, (getattr(queue, name) & ~(_ALL_ONES << shift)) | (value << shift))
        return True

    def _write_queue_ready(self, ready: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self.stats.bad_accesses += 1
        elif not ready:
            # Linux writes 0 when it deletes a queue; the ring is gone.
            queue.ready = False
            queue.detach()
        elif self._configurable_queue() is not None:
            queue.ready = True
            if self.running:
                self._attach(self._queue_sel)
        elif not queue.ready:
            self.stats.bad_accesses += 1

    # --- Status. ---

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & spec.STATUS_FAILED:
            self.status |= spec.STATUS_FAILED  # the driver gave up: leave guest memory alone
            for queue in self.queues:
                queue.detach()
        # DEVICE_NEEDS_RESET is the device's bit: the driver's copy is ignored.
        current = self.status & _DRIVER_STATUS_BITS
        wanted = value & _DRIVER_STATUS_BITS
        if current & ~wanted:
            self.stats.bad_accesses += 1  # the driver may not clear a bit but by resetting
            return
        added, reached = [], current
        for bit, needed in _STATUS_STEPS:
            if wanted & bit and not current & bit:
                if needed and not reached & needed:
                    self.stats.bad_accesses += 1  # a step skipped: the whole write is ignored
                    return
                added.append(bit)
                reached |= bit
        for bit in added:
            if bit == spec.STATUS_FEATURES_OK and not self._features_acceptable():
                self.stats.features_refused += 1
                return  # the driver reads FEATURES_OK back clear and gives up
            self.status |= bit
            if bit == spec.STATUS_DRIVER_OK:
                self._activate()

    def _features_acceptable(self) -> bool:
        unoffered = self.driver_features & ~self.offered_features()
        version_1 = self.driver_features & spec.feature_bit(spec.F_VERSION_1)
        return not unoffered and not self._unofferable_features and bool(version_1)

    def _activate(self) -> None:
        if not self.running:  # FAILED came in the same write, or the device already needs a reset
            return
        for index, queue in enumerate(self.queues):
            if queue.ready and not self._attach(index):
                return
        self.device.activate(self.memory, self.queues, self.driver_features)

    def _attach(self, index: int) -> bool:
        try:
            self.queues[index].attach(self.memory, self.driver_features)
        except VirtqueueError as err:
            self.set_needs_reset(f"queue {index}: {err}")
            return False
        return True

    def reset(self) -> None:
        """The driver wrote 0 to Status: back to the power-on state (the config generation goes on)."""
        self._clear()
        self.device.reset()
        self.stats.resets += 1

    def set_needs_reset(self, reason: str) -> None:
        """Stop using guest memory until the driver resets the device, and tell it so."""
        if self.status & spec.STATUS_DEVICE_NEEDS_RESET:
            return
        self.status |= spec.STATUS_DEVICE_NEEDS_RESET
        self.needs_reset_reason = reason
        self.stats.needs_reset += 1
        for queue in self.queues:
            queue.detach()
        if self.status & spec.STATUS_DRIVER_OK:
            self._interrupt(registers.INTERRUPT_CONFIG_CHANGE)

    # --- Saved state (saved_state.py reads and checks the records). ---

    def registers_state(self) -> dict:
        return {"status": self.status, "driver_features": self.driver_features,
                "interrupt_status": self.interrupt_status, "raised_since_read": self._raised_since_read,
                "config_generation": self.config_generation,
                "device_features_sel": self._device_features_sel, "driver_features_sel": self._driver_features_sel,
                "queue_sel": self._queue_sel}

    @property
    def unofferable_features(self) -> bool:
        return self._unofferable_features

    def restore_registers(self, fields: dict, unofferable: bool, reason: str | None) -> None:
        self._clear()
        self.status, self.driver_features = fields["status"], fields["driver_features"]
        self.interrupt_status, self.config_generation = fields["interrupt_status"], fields["config_generation"]
        self._raised_since_read = fields["raised_since_read"]
        self._device_features_sel, self._driver_features_sel = fields["device_features_sel"], fields["driver_features_sel"]
        self._queue_sel, self._unofferable_features, self.needs_reset_reason = fields["queue_sel"], unofferable, reason

    # --- Queues and interrupts. ---

    def notify(self, index: int, kicks: int = 1) -> None:
        """The driver kicked queue ``index`` ``kicks`` times (an eventfd adds up those it has not
        handed over yet; a QueueNotify write is one): serve it."""
        if not 0 <= index < len(self.queues):
            self.stats.ignored_notifications += 1
            return
        self.queues[index].stats.notifications += kicks
        if not self.running or not self.queues[index].attached:
            self.stats.ignored_notifications += 1
            return
        self.process_queue(index)

    def process_queue(self, index: int) -> None:
        """Serve queue ``index`` until it is drained, then interrupt if the driver wants one.

        Also for host-side events, such as console input arriving for the
        receive queue. A broken rule ends in DEVICE_NEEDS_RESET, never in an
        exception.
        """
        queue = self.queues[index]
        if not self.running or not queue.attached:
            return
        problem = None
        try:
            while True:
                queue.suppress_notifications()
                completed = self.device.process(index)
                more = queue.enable_notifications()
                if not (completed and more):
                    break
        except (VirtqueueError, GuestMemoryError) as err:
            problem = f"queue {index}: {err}"
        # Chains completed before a broken one are the driver's: it hears of them.
        if queue.needs_interrupt():
            queue.stats.interrupts += 1
            self._interrupt(registers.INTERRUPT_USED_BUFFER)
        if problem:
            self.set_needs_reset(problem)

    def config_changed(self) -> None:
        """The device's configuration space changed (a resized disk): tell the driver."""
        self.config_generation = (self.config_generation + 1) & _ALL_ONES
        if self.status & spec.STATUS_DRIVER_OK:
            self._interrupt(registers.INTERRUPT_CONFIG_CHANGE)

    def _interrupt(self, reason: int) -> None:
        self.interrupt_status |= reason
        self._raised_since_read |= reason
        self.stats.interrupts += 1
        if reason == registers.INTERRUPT_CONFIG_CHANGE:
            self.stats.config_interrupts += 1
        try:
            self._trigger()
        except OSError:
            self.stats.trigger_errors += 1
