"""The device model's polling window: KVM's halt-polling rules as pure logic."""

import pytest

from mpvmm.transport.polling import GROW, POLL_LIMIT_SECONDS, POLL_START_SECONDS, PollWindow, poll_limit_seconds

US = 1e-6


def test_a_wait_inside_the_window_leaves_it_alone():
    window = PollWindow(limit=200 * US, start=10 * US)
    window.record(5 * US)
    assert window.window == 10 * US and window.grown == window.shrunk == 0


def test_a_wait_a_longer_window_would_have_caught_grows_it_up_to_the_limit():
    window = PollWindow(limit=200 * US, start=10 * US)
    for expected in (20, 40, 80, 160, 200, 200):
        window.record(190 * US)
        assert window.window == pytest.approx(expected * US)
    assert window.grown == 5  # the last wait fell inside the grown window


def test_a_wait_past_the_limit_shrinks_it_to_nothing():
    window = PollWindow(limit=200 * US, start=10 * US)
    window.window = 80 * US
    window.record(1.0)
    assert window.window == pytest.approx(40 * US)
    window.record(1.0)
    window.record(1.0)
    assert window.window == pytest.approx(10 * US)
    window.record(1.0)
    assert window.window == 0.0  # below the start: stop polling
    window.record(1.0)
    assert window.shrunk == 4  # nothing left to shrink
    window.record(50 * US)  # short waits again: polling would pay, start over
    assert window.window == 10 * US


def test_no_limit_means_no_polling_ever():
    window = PollWindow(limit=0.0)
    for waited in (1 * US, 100 * US, 1.0):
        window.record(waited)
    assert window.window == 0.0 and window.grown == 0


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        PollWindow(limit=-1.0)
    with pytest.raises(ValueError):
        PollWindow(start=0.0)


def test_polling_only_with_a_core_to_spare():
    assert poll_limit_seconds(1, usable_cores=2) == POLL_LIMIT_SECONDS
    assert poll_limit_seconds(2, usable_cores=2) == 0.0  # the vCPUs need both cores
    assert poll_limit_seconds(8, usable_cores=16) == POLL_LIMIT_SECONDS
    assert POLL_START_SECONDS * GROW <= POLL_LIMIT_SECONDS <= 1e-3
