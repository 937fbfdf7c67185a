"""A split virtqueue (spec 2.7), from the device's side.

The driver configures the queue through the transport (size and the guest
addresses of the descriptor table, available ring and used ring); once the
device is running, ``attach`` checks that layout against guest RAM and the
queue starts serving: ``pop`` takes the next available chain (checked whole by
``descriptors.walk_chain``), ``push_used`` returns it.

Notification suppression both ways:

- the driver's notifications ("kicks"): while the device is busy it asks for
  none (``VIRTQ_USED_F_NO_NOTIFY``, or with EVENT_IDX by leaving
  ``avail_event`` behind); ``enable_notifications`` asks again and then
  re-reads the available index, so a chain added in between is never missed;
- the device's interrupts: ``needs_interrupt`` honours
  ``VIRTQ_AVAIL_F_NO_INTERRUPT``, or with EVENT_IDX the driver's
  ``used_event`` through the ``vring_need_event`` rule.

Both re-reads follow a store of ours, so a full barrier sits between them
(``GuestRam.fence``), as in Linux's vhost and rust-vmm.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

from mpvmm.virtio import spec
from mpvmm.virtio.descriptors import DescriptorChain, walk_chain
from mpvmm.virtio.faults import VirtqueueError
from mpvmm.virtio.memory import GuestRam

_USED_ELEMENT = struct.Struct("<II")


@dataclass
class QueueStats:
    """Plain counters of one queue; the owner turns them into metrics."""

    notifications: int = 0  # available-buffer notifications (ioeventfd or QueueNotify)
    chains: int = 0  # descriptor chains taken from the available ring
    used: int = 0  # entries returned in the used ring
    bytes_read: int = 0  # device-readable bytes the device consumed
    bytes_written: int = 0  # bytes the device wrote into guest buffers (the used lengths)
    interrupts: int = 0  # used-buffer notifications sent to the driver
    interrupts_suppressed: int = 0  # checks where the driver asked for none

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class SplitQueue:
    """One split virtqueue; ``max_size`` is what QueueNumMax reports."""

    def __init__(self, max_size: int):
        if not _is_power_of_two(max_size) or max_size > spec.QUEUE_SIZE_LIMIT:
            raise ValueError(f"queue size {max_size} is not a power of two up to {spec.QUEUE_SIZE_LIMIT}")
        self.max_size = max_size
        self.stats = QueueStats()
        self.reset()

    def reset(self) -> None:
        """The state after a device reset: unconfigured, not ready."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.detach()

    def detach(self) -> None:
        """Stop serving; the next ``attach`` starts from index 0, as a driver's fresh ring does."""
        self._memory: GuestRam | None = None
        self.event_idx = False
        self.indirect = False
        self.next_avail = 0
        self.next_used = 0
        # The used index at the last interrupt check. A fresh ring starts at
        # 0 with nothing used, so the driver has had every interrupt it asked
        # for (vhost, which may take over a running ring, must instead
        # interrupt once when in doubt).
        self._signalled_used = 0
        self._unchecked_used = 0  # entries pushed since that check
        self._kicks_suppressed = False

    @property
    def attached(self) -> bool:
        return self._memory is not None

    # --- Set-up. ---

    def layout_error(self, memory: GuestRam) -> str | None:
        """What is wrong with the configured layout, or None."""
        if not _is_power_of_two(self.size) or self.size > self.max_size:
            return f"queue size {self.size} is not a power of two up to {self.max_size}"
        rings = (
            ("descriptor table", self.desc_table, spec.DESCRIPTOR_TABLE_ALIGN, spec.descriptor_table_size(self.size)),
            ("available ring", self.avail_ring, spec.AVAIL_RING_ALIGN, spec.avail_ring_size(self.size)),
            ("used ring", self.used_ring, spec.USED_RING_ALIGN, spec.used_ring_size(self.size)),
        )
        for name, address, align, length in rings:
            if address % align:
                return f"{name} at {address:#x} is not {align}-byte aligned"
            if not memory.contains(address, length):
                return f"{name} {address:#x}+{length:#x} is not guest RAM"
        return None

    def attach(self, memory: GuestRam, features: int) -> None:
        """Start serving over ``memory`` with the negotiated ``features``; VirtqueueError if the layout is bad."""
        problem = self.layout_error(memory)
        if problem:
            raise VirtqueueError(problem)
        self.detach()
        self._memory = memory
        self.event_idx = bool(features & spec.feature_bit(spec.F_EVENT_IDX))
        self.indirect = bool(features & spec.feature_bit(spec.F_INDIRECT_DESC))

    # --- Saved state (snapshots): the ring's configuration and both indexes. ---

    def state(self) -> dict:
        return {"size": self.size, "ready": self.ready, "desc_table": self.desc_table,
                "avail_ring": self.avail_ring, "used_ring": self.used_ring, "attached": self.attached,
                "next_avail": self.next_avail, "next_used": self.next_used,
                "signalled_used": self._signalled_used, "unchecked_used": self._unchecked_used,
                "kicks_suppressed": self._kicks_suppressed}

    def restore(self, record: dict, memory: GuestRam, features: int) -> None:
        """Take ``state()``'s record (already type-checked); VirtqueueError if its ring is not guest RAM."""
        self.reset()
        self.size, self.ready = record["size"], record["ready"]
        self.desc_table, self.avail_ring, self.used_ring = record["desc_table"], record["avail_ring"], record["used_ring"]
        if record["attached"]:
            self.attach(memory, features)
            self.next_avail, self.next_used = record["next_avail"] & 0xFFFF, record["next_used"] & 0xFFFF
            self._signalled_used = record["signalled_used"] & 0xFFFF
            self._unchecked_used = record["unchecked_used"] & 0xFFFF
            self._kicks_suppressed = record["kicks_suppressed"]

    # --- The available ring. ---

    def _avail_idx(self) -> int:
        return self._memory.read_u16(self.avail_ring + 2)

    def has_available(self) -> bool:
        return self._avail_idx() != self.next_avail

    def pop(self) -> DescriptorChain | None:
        """The next available chain, checked; None when the ring is empty. VirtqueueError on a bad one."""
        memory = self._memory
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"available index moved from {self.next_avail} to {avail_idx}, past the queue size")
        slot = self.avail_ring + spec.RING_HEADER_SIZE + 2 * (self.next_avail % self.size)
        head = memory.read_u16(slot)
        chain = walk_chain(memory, self.desc_table, self.size, head, self.indirect)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self.stats.chains += 1
        return chain

    # --- The used ring. ---

    def push_used(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, ``written`` bytes of its writable buffers filled."""
        memory = self._memory
        slot = self.used_ring + spec.RING_HEADER_SIZE + spec.USED_ELEMENT_SIZE * (self.next_used % self.size)
        memory.write(slot, _USED_ELEMENT.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the index.
        memory.write_u16(self.used_ring + 2, self.next_used)
        self._unchecked_used += 1
        self.stats.used += 1
        self.stats.bytes_written += written

    # --- Notification suppression. ---

    def _avail_event_address(self) -> int:
        return self.used_ring + spec.RING_HEADER_SIZE + spec.USED_ELEMENT_SIZE * self.size

    def _used_event_address(self) -> int:
        return self.avail_ring + spec.RING_HEADER_SIZE + 2 * self.size

    def suppress_notifications(self) -> None:
        """Ask the driver not to notify while the device is draining the ring anyway."""
        if not self.event_idx and not self._kicks_suppressed:
            # With EVENT_IDX there is nothing to do: avail_event stays where
            # it was, so new chains do not cross it.
            self._memory.write_u16(self.used_ring, spec.VIRTQ_USED_F_NO_NOTIFY)
            self._kicks_suppressed = True

    def enable_notifications(self) -> bool:
        """Ask for the next notification; True if chains arrived meanwhile (drain again, or one is lost)."""
        memory = self._memory
        if self.event_idx:
            memory.write_u16(self._avail_event_address(), self.next_avail)
        elif self._kicks_suppressed:
            memory.write_u16(self.used_ring, 0)
            self._kicks_suppressed = False
        memory.fence()
        return self.has_available()

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was used since the last check."""
        if not self._unchecked_used:
            return False
        new, old = self.next_used, self._signalled_used
        self._signalled_used = new
        self._unchecked_used = 0
        memory = self._memory
        memory.fence()  # our used index is out before we read the driver's wishes
        if self.event_idx:
            wanted = spec.vring_need_event(memory.read_u16(self._used_event_address()), new, old)
        else:
            wanted = not memory.read_u16(self.avail_ring) & spec.VIRTQ_AVAIL_F_NO_INTERRUPT
        if not wanted:
            self.stats.interrupts_suppressed += 1
        return wanted
