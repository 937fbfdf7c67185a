"""The pages a running guest writes, from KVM's dirty logging, as runs of guest RAM.

With KVM_MEM_LOG_DIRTY_PAGES on its memory slots, KVM write-protects
guest RAM and marks each page the guest then writes; KVM_GET_DIRTY_LOG
hands over one slot's bitmap and starts a new one (docs/design.md, "Dirty
logging and state save": a CPL-3 guest's 64 writes showed as 69 pages,
its page tables' accessed and dirty bits being the rest). A migration
copies what was dirtied while it copied, round after round.
"""

from __future__ import annotations

import ctypes

from mpvmm.snapshot.ram import MAX_RUN
from mpvmm.x86.layout import PAGE_SIZE

_WORD_PAGES = 64
_ALL_ONES = (1 << _WORD_PAGES) - 1


def bitmap_runs(words, base_offset: int) -> list[tuple[int, int]]:
    """(RAM offset, length) runs of the set bits of a dirty bitmap whose page 0 is at ``base_offset``.

    Adjacent pages merge into one run of at most MAX_RUN bytes; a word with
    no bit set costs one comparison, one with all 64 set one run extension.
    """
    runs: list[tuple[int, int]] = []
    start = end = -1

    def add(page_start: int, pages: int) -> None:
        nonlocal start, end
        offset = base_offset + page_start * PAGE_SIZE
        if offset == end and end - start < MAX_RUN:
            end = offset + pages * PAGE_SIZE
            return
        if start >= 0:
            runs.append((start, end - start))
        start, end = offset, offset + pages * PAGE_SIZE

    for index, word in enumerate(words):
        if not word:
            continue
        first = index * _WORD_PAGES
        if word == _ALL_ONES:
            add(first, _WORD_PAGES)
            continue
        while word:
            low = word & -word
            add(first + low.bit_length() - 1, 1)
            word ^= low
    if start >= 0:
        runs.append((start, end - start))
    return [piece for run in runs for piece in _split(*run)]


def _split(offset: int, length: int) -> list[tuple[int, int]]:
    return [(offset + at, min(MAX_RUN, length - at)) for at in range(0, length, MAX_RUN)]


class DirtyLog:
    """Dirty logging over every memory slot of ``machine`` (supervisor.vm.VirtualMachine)."""

    def __init__(self, machine, memory):
        self._machine = machine
        self._slots = []  # (RAM offset of the slot's first page, its bitmap)
        for _guest_address, size, offset in memory.regions():
            words = -(-(size // PAGE_SIZE) // _WORD_PAGES)
            self._slots.append((offset, (ctypes.c_uint64 * words)()))
        self.on = False

    def start(self) -> None:
        self._machine.log_dirty_pages(True)
        self.on = True

    def stop(self) -> None:
        if self.on:
            self._machine.log_dirty_pages(False)
            self.on = False

    def collect(self) -> list[tuple[int, int]]:
        """The runs written since ``start`` or the last ``collect``."""
        self._machine.dirty_bitmaps([bitmap for _offset, bitmap in self._slots])
        runs = []
        for offset, bitmap in self._slots:
            runs += bitmap_runs(bitmap, offset)
        return runs
