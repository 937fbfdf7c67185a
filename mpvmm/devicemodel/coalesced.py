"""KVM's coalesced MMIO ring, as the device model drains it.

Writes to the ranges devices declared coalescible never leave KVM: it
appends each to one ring per VM (address, width, up to 8 bytes of data, a
port-or-MMIO flag; no vCPU number) and the guest goes on. The ring is a
page in every vCPU fd's mmap, at the offset KVM_CHECK_EXTENSION(
KVM_CAP_COALESCED_MMIO) gives; the supervisor passes the device model one
vCPU fd, and the device model maps that page and nothing else. KVM writes
an entry, then ``last``; the device model handles entries from ``first`` and
advances ``first`` past each once it is handled. A full ring (one slot is
always left free) makes KVM fall back to an ordinary exit for that write,
which the run loop then sends and waits for, so it cannot overtake the
entries still here (docs/protocol.md, "Ordering").

The ring is drained before every request the device model handles (a read
must see the same vCPU's earlier writes) and at least every millisecond
(``DRAIN_INTERVAL_SECONDS``), so no write waits long for its device.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Callable

from mpvmm.kvm import bindings as kb

DRAIN_INTERVAL_SECONDS = 0.001
ENTRIES = kb.COALESCED_RING_ENTRIES
_VALID_SIZES = (1, 2, 4, 8)
_SPACE_PIO, _SPACE_MMIO = 0, 1  # protocol.SPACE_PIO, SPACE_MMIO

Writer = Callable[[int, int, int, int], None]  # (space, address, size, value)


class CoalescedRing:
    """A mapped ring page (an ``mmap`` of one page: KVM's, or an anonymous one in tests) and its counters."""

    def __init__(self, page: mmap.mmap):
        self._page = page
        self._header = kb.kvm_coalesced_mmio_ring.from_buffer(page)
        offset, size = ctypes.sizeof(kb.kvm_coalesced_mmio_ring), ctypes.sizeof(kb.kvm_coalesced_mmio)
        self._entries = [kb.kvm_coalesced_mmio.from_buffer(page, offset + i * size) for i in range(ENTRIES)]
        self.drains = 0  # drains that found entries
        self.drained = 0  # entries handled
        self.peak = 0  # the most entries found waiting at once
        self.malformed = 0  # entries with a width KVM never writes

    @classmethod
    def map(cls, vcpu_fd: int, page_offset: int) -> "CoalescedRing":
        """Map the ring page of ``vcpu_fd`` (only that page), then close the fd: the mapping is enough."""
        try:
            page = mmap.mmap(vcpu_fd, mmap.PAGESIZE, offset=page_offset * mmap.PAGESIZE)
        finally:
            os.close(vcpu_fd)
        return cls(page)

    def pending(self) -> int:
        """Entries KVM has added and we have not handled."""
        header = self._header
        return (header.last - header.first) % ENTRIES if header.last < ENTRIES else 0

    def drain(self, write: Writer) -> int:
        """Hand every entry present now to ``write``, in order; returns how many."""
        header = self._header
        first, last = header.first, header.last
        if first == last or last >= ENTRIES or first >= ENTRIES:
            return 0
        waiting = (last - first) % ENTRIES
        self.peak = max(self.peak, waiting)
        self.drains += 1
        for _ in range(waiting):
            entry = self._entries[first]
            size = entry.len
            if size in _VALID_SIZES:
                value = int.from_bytes(bytes(entry.data)[:size], "little")
                write(_SPACE_PIO if entry.pio else _SPACE_MMIO, entry.phys_addr, size, value)
            else:
                self.malformed += 1
            first = (first + 1) % ENTRIES
            header.first = first  # one slot free again for KVM, as soon as it is handled
        self.drained += waiting
        return waiting

    def stats(self) -> dict[str, int]:
        return {"drains": self.drains, "entries": self.drained, "pending": self.pending(),
                "peak": self.peak, "malformed": self.malformed, "capacity": ENTRIES - 1}

    def close(self) -> None:
        self._header = None
        self._entries = []
        self._page.close()
