"""Dirty bitmaps as runs of guest RAM (pure), and KVM's dirty log of a running guest (real KVM)."""

import time

from mpvmm.migration.dirty_log import DirtyLog, bitmap_runs
from mpvmm.snapshot.ram import MAX_RUN
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.x86 import layout

PAGE = 4096
ALL = (1 << 64) - 1


def test_no_bits_no_runs():
    assert bitmap_runs([0, 0, 0], 0) == []


def test_single_pages_and_adjacent_ones():
    words = [0b1011, 1 << 63, 1]  # pages 0, 1, 3; 127 and 128 (adjacent across words)
    assert bitmap_runs(words, 0) == [(0, 2 * PAGE), (3 * PAGE, PAGE), (127 * PAGE, 2 * PAGE)]


def test_offsets_are_relative_to_the_slot():
    base = 3 << 30  # RAM above the hole starts at this host offset
    assert bitmap_runs([0b100], base) == [(base + 2 * PAGE, PAGE)]


def test_full_words_make_long_runs_cut_at_max_run():
    words = [ALL] * (2 * MAX_RUN // (64 * PAGE) + 1)
    runs = bitmap_runs(words, 0)
    assert runs[0] == (0, MAX_RUN) and runs[1] == (MAX_RUN, MAX_RUN)
    assert sum(length for _, length in runs) == len(words) * 64 * PAGE
    assert all(length <= MAX_RUN for _, length in runs)


def test_the_log_shows_the_pages_the_guest_writes(no_leaks):
    seen = {}

    def watch(vm):
        time.sleep(0.2)
        log = DirtyLog(vm.host.machine, vm.memory)
        log.start()
        deadline = time.monotonic() + 5
        runs = []
        while time.monotonic() < deadline and not any(offset == layout.GUEST_SHARED_ADDR for offset, _ in runs):
            time.sleep(0.05)
            runs = log.collect()
        seen["runs"] = runs
        log.stop()

    config = RunConfig(cpus=2, memory=64 << 20, workload="atomics", seconds=0.5)
    assert Supervisor(config, on_started=watch).run().exit_code == 0
    offsets = {offset for offset, _length in seen["runs"]}
    # The shared counters and the reports: what the atomics workload writes, and no code.
    assert layout.GUEST_SHARED_ADDR in offsets
    assert layout.GUEST_REPORTS_ADDR in offsets
    assert not offsets & {layout.GUEST_CODE_ADDR, layout.BOOT_GDT_ADDR}
