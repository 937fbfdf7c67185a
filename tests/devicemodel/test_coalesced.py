"""Draining KVM's coalesced ring, on a page written as KVM writes it (the real one: tests/kvm, test_run_builtin)."""

import ctypes
import mmap

import pytest

from mpvmm.devicemodel.coalesced import ENTRIES, CoalescedRing
from mpvmm.kvm import bindings as kb


class Kvm:
    """The producer's side, as virt/kvm/coalesced_mmio.c does it: the entry, then ``last``."""

    def __init__(self, page):
        self.page = page
        self.header = kb.kvm_coalesced_mmio_ring.from_buffer(page)

    def write(self, address, size, value, pio=False):
        header = self.header
        if (header.last + 1) % ENTRIES == header.first:
            return False  # full: KVM exits instead
        entry = kb.kvm_coalesced_mmio.from_buffer(
            self.page, ctypes.sizeof(header) + header.last * ctypes.sizeof(kb.kvm_coalesced_mmio))
        entry.phys_addr, entry.len, entry.pio = address, size, int(pio)
        ctypes.memmove(entry.data, value.to_bytes(8, "little"), 8)
        header.last = (header.last + 1) % ENTRIES
        return True


@pytest.fixture
def rings():
    page = mmap.mmap(-1, mmap.PAGESIZE)
    ring = CoalescedRing(page)
    kvm = Kvm(page)
    yield ring, kvm
    kvm.header = None  # no view left on the page, so it can be unmapped
    ring.close()


def test_entries_come_out_in_order_with_their_space_and_width(rings):
    ring, kvm = rings
    kvm.write(0x520, 4, 0x11223344, pio=True)
    kvm.write(0xD0000008, 8, 0xAABBCCDD_EEFF0011)
    kvm.write(0x3F8, 1, 0x1FF, pio=True)  # only the low byte was written
    seen = []
    assert ring.drain(lambda *write: seen.append(write)) == 3
    assert seen == [(0, 0x520, 4, 0x11223344), (1, 0xD0000008, 8, 0xAABBCCDD_EEFF0011), (0, 0x3F8, 1, 0xFF)]
    assert ring.pending() == 0 and kvm.header.first == kvm.header.last == 3


def test_the_ring_holds_one_less_than_its_slots_and_wraps(rings):
    ring, kvm = rings
    written = 0
    while kvm.write(0x520, 4, written, pio=True):
        written += 1
    assert written == ENTRIES - 1 == ring.stats()["capacity"]
    values = []
    ring.drain(lambda space, address, size, value: values.append(value))
    for more in range(10):  # across the end of the page
        kvm.write(0x520, 4, written + more, pio=True)
    ring.drain(lambda space, address, size, value: values.append(value))
    assert values == list(range(written + 10))
    assert ring.stats() | {"pending": 0} == {"drains": 2, "entries": written + 10, "pending": 0,
                                             "peak": ENTRIES - 1, "malformed": 0, "capacity": ENTRIES - 1}


def test_first_advances_entry_by_entry_so_kvm_has_room_at_once(rings):
    ring, kvm = rings
    for value in range(3):
        kvm.write(0x520, 4, value, pio=True)
    firsts = []
    ring.drain(lambda *write: firsts.append(kvm.header.first))
    assert firsts == [0, 1, 2]  # each write is handled before its slot is given back


def test_an_entry_of_an_impossible_width_is_counted_and_skipped(rings):
    ring, kvm = rings
    kvm.write(0x520, 3, 7, pio=True)
    kvm.write(0x520, 4, 8, pio=True)
    seen = []
    assert ring.drain(lambda *write: seen.append(write)) == 2
    assert seen == [(0, 0x520, 4, 8)] and ring.malformed == 1


def test_an_empty_or_nonsensical_ring_drains_nothing(rings):
    ring, kvm = rings
    assert ring.drain(lambda *write: pytest.fail("nothing to drain")) == 0
    kvm.header.last = ENTRIES + 5  # not an index KVM would write
    assert ring.drain(lambda *write: pytest.fail("nothing to trust")) == 0
    assert ring.pending() == 0 and ring.drains == 0
