"""One measured run: the window counts the exits inside it, and --pin pins."""

import os

import pytest

from mpvmm.bench.measure import measure, pin_plan

# The snapshot reads the VMM's counters and the guest's a few microseconds
# apart, so the two may differ by the exits made in between.
TOLERANCE = 0.01


def vcpu_affinities():
    affinities = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith("vcpu"):
                affinities[name] = sorted(os.sched_getaffinity(int(tid)))
        except OSError:
            pass  # the thread ended meanwhile
    return affinities


@pytest.mark.parametrize("runner", ["raw", "native"])
def test_window_counts_the_exits_inside_it(runner, no_leaks):
    sample = measure("pio-null", runner, 2, 0.5)
    assert 0.5 <= sample.seconds < 0.9
    guest_writes = sample.guest_ops["pio_null_writes"]
    assert guest_writes > 0 and all(e > 0 for e in sample.exits)
    assert sum(sample.exits) == pytest.approx(guest_writes, rel=TOLERANCE, abs=20)
    assert sample.pinned_cpus is None


@pytest.mark.parametrize("runner", ["raw", "native"])
def test_pin_puts_each_vcpu_thread_on_its_own_cpu(runner, no_leaks):
    seen = []
    sample = measure("pio-null", runner, 2, 0.3, pin=True, on_progress=lambda _: seen.append(vcpu_affinities()))
    plan = pin_plan(2)
    if plan is None:
        pytest.skip("this host has a single usable CPU")
    assert sample.pinned_cpus == plan
    assert seen and seen[-1] == {"vcpu0": [plan[0]], "vcpu1": [plan[1]]}


def test_no_pinning_where_there_are_too_few_cpus():
    assert pin_plan(len(os.sched_getaffinity(0)) + 1) is None
    assert pin_plan(1) == [min(os.sched_getaffinity(0))]
