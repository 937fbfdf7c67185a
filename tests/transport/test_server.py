"""The ring transport's two ends in one process: a vCPU's RingChannel and the device model's RingServer."""

import os

import pytest

from mpvmm.transport.channel import RequestOrder, RingChannel
from mpvmm.transport.ring import RING_SLOTS, RingArea
from mpvmm.transport.server import PER_VCPU_BATCH, RingServer
from tests.devicemodel.test_rounds import Device


class Counts:
    """The stats-page counters a channel bumps."""

    posted_stalls = server_wakeups = reply_sleeps = 0


class Clock:
    """A clock that moves only when asked, and a microsecond per reading (so polls end)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        self.now += 1e-6
        return self.now


@pytest.fixture
def ends(kvm_available):
    area = RingArea.create(2)
    wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    clock = Clock()
    server = RingServer(RingArea.attach(os.dup(area.fd)), os.dup(wake_fd), poll_limit=200e-6, clock=clock)
    order = RequestOrder()
    channels = [RingChannel(area.requests(i), area.replies(i), area.header, wake_fd, order) for i in range(2)]
    yield server, channels, clock
    server.close()
    area.close()
    order.close()
    os.close(wake_fd)


def test_vcpus_are_served_in_the_order_of_their_requests_a_batch_per_vcpu_at_a_time(ends):
    """vCPU 0 made 20 requests, vCPU 1 three among them: performed as made, not one channel first, and a
    serve() ends after a batch per vCPU so the device model's other work gets a turn."""
    server, channels, _ = ends
    stamps = {1: (3, 7, 11)}
    made = [(1 if stamp in stamps[1] else 0, stamp) for stamp in range(1, 24)]
    for vcpu, stamp in made:
        assert channels[vcpu].send(b"w%d@%d" % (vcpu, stamp), Counts(), lambda: False)
    device = Device()
    assert server.serve(set(), device)  # more are waiting
    assert len(device.performed) == 2 * PER_VCPU_BATCH
    while server.serve(set(), device):
        pass
    assert device.performed == [b"w%d@%d" % made_by for made_by in made]
    assert server.received == [20, 3]


def test_a_read_is_answered_after_the_writes_another_vcpu_made_before_it(ends):
    """vCPU 1's read reached its ring before vCPU 0's 20 earlier writes reached theirs: it waits for all."""
    server, channels, _ = ends
    channels[1].send(b"read@21", Counts(), lambda: False)
    for i in range(20):
        channels[0].send(b"w%d@%d" % (i, i + 1), Counts(), lambda: False)
    device = Device()
    while server.serve(set(), device):
        pass
    assert device.performed == [b"w%d@%d" % (i, i + 1) for i in range(20)] + [b"read@21"]
    assert channels[1].receive(Counts()) == b"ok read@21"


def test_replies_go_back_on_the_ring_the_request_came_from(ends):
    server, channels, _ = ends
    channels[1].send(b"read claiming to be vcpu 0", Counts(), lambda: False)
    server.serve(set(), Device())
    assert server.replies_sent == 1
    assert channels[1].receive(Counts()) == b"ok read claiming to be vcpu 0"
    assert channels[0].replies.pop() is None


def test_a_reply_with_no_room_is_dropped_and_counted(ends):
    server, channels, _ = ends
    for i in range(RING_SLOTS + 1):
        channels[0].send(b"read %d" % i, Counts(), lambda: False)
        server.serve(set(), Device())
    assert (server.replies_sent, server.replies_dropped) == (RING_SLOTS, 1)


def test_a_vcpu_wakes_the_server_only_when_it_said_it_sleeps(ends):
    server, channels, _ = ends
    counts = Counts()
    channels[0].send(b"w", counts, lambda: False)  # awake: no eventfd write
    assert counts.server_wakeups == 0
    assert not server.prepare_sleep()  # a record is waiting: do not sleep
    assert server.area.header.server_sleeping == 0
    server.serve(set(), Device())
    assert server.prepare_sleep() and server.area.header.server_sleeping == 1
    channels[1].send(b"w", counts, lambda: False)
    assert counts.server_wakeups == 1 and server.area.header.server_sleeping == 0
    channels[1].send(b"w", counts, lambda: False)  # it was told once; it is waking
    assert counts.server_wakeups == 1
    server.woke({server.wake_fd})
    assert (server.wakeups, server.sleeps) == (1, 1)


def test_polling_finds_what_arrives_and_the_window_adapts(ends):
    server, channels, clock = ends
    assert not server.serve(set(), Device())  # idle from now
    assert not server.poll()  # nothing came in the window
    assert server.polled_hits == 0 and server.poll_seconds > 0
    channels[0].send(b"w", Counts(), lambda: False)
    assert server.poll() and server.polled_hits == 1
    start = server.window.window
    clock.now += 100e-6  # this wait was longer than the window, shorter than the limit
    server.serve(set(), Device())
    assert server.window.window == 2 * start


def test_polling_gives_way_to_anyone_who_wants_the_core(ends):
    server, channels, clock = ends
    yields = []

    def yield_cpu():  # another task ran meanwhile: this look comes back late
        yields.append(clock.now)
        clock.now += 100e-6

    server._yield = yield_cpu
    server.window.window = 80e-6
    assert not server.poll()
    assert len(yields) == 1 and server.poll_preempted == 1  # it stopped at once
    assert server.window.window == 80e-6  # the wait itself, once it ends, decides the window


def test_a_full_request_ring_stalls_the_vcpu_until_a_stop(ends):
    server, channels, _ = ends
    counts = Counts()
    for _ in range(RING_SLOTS):
        assert channels[0].send(b"w", counts, lambda: False)
    stops = iter([False, True])
    assert not channels[0].send(b"one more", counts, lambda: next(stops))
    assert counts.posted_stalls == 1


def test_stats_say_what_the_transport_did(ends):
    server, channels, _ = ends
    channels[0].send(b"read", Counts(), lambda: False)
    server.serve(set(), Device())
    stats = server.stats()
    assert stats["transport"] == "ring" and stats["received"] == [1, 0] and stats["replies_sent"] == 1
    assert stats["poll_limit_seconds"] == 200e-6
    assert {"wakeups", "polled_hits", "sleeps", "poll_seconds", "poll_preempted"} <= set(stats)
