"""The device model's rounds (rounds.py): fair, and a read answered after every write queued before it.

First the rules on fake channels; then both real transports (shared-memory
rings, POSIX message queues) with the device model's own ``perform``, which
drains KVM's coalesced ring (a page in this process, filled as KVM would)
before each access.
"""

import mmap
import os
import secrets

import posix_ipc
import pytest

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS, Bus, BusRange
from mpvmm.devicemodel.coalesced import CoalescedRing
from mpvmm.devicemodel.machine import DeviceModel
from mpvmm.devicemodel.process import DeviceModelServer
from mpvmm.devicemodel.protocol import (KIND_READ, KIND_WRITE, KIND_WRITE_ACKED, MAX_MESSAGE_SIZE, SPACE_PIO,
                                        decode_reply, encode_request)
from mpvmm.devicemodel.rounds import answer_reads, take
from mpvmm.transport.channel import RingChannel
from mpvmm.transport.ring import RingArea
from mpvmm.transport.server import PER_VCPU_BATCH, QueueServer, RingServer
from tests.devicemodel.test_coalesced import Kvm as CoalescedProducer

# --- The rules, on fake channels. ---


class Record:
    def __init__(self, data):
        self.data = data
        self.is_read = data.startswith(b"r")


class Channels:
    """Request lists per vCPU, and the replies sent."""

    def __init__(self, *requests):
        self.requests = [list(r) for r in requests]
        self.replies = []

    def pop(self, index):
        return self.requests[index].pop(0) if self.requests[index] else None

    def reply(self, index, record):
        self.replies.append((index, record))

    def ready_now(self):
        return [index for index, requests in enumerate(self.requests) if requests]


class Device:
    """Performs in order; reads and acknowledged writes (b"a...") are answered."""

    def __init__(self):
        self.performed = []

    def decode(self, record):
        return None if record == b"malformed" else Record(record)

    def perform(self, request):
        self.performed.append(request.data)
        return b"ok " + request.data if request.is_read or request.data.startswith(b"a") else None


def test_take_stops_at_a_read_and_keeps_it():
    channels, device, kept = Channels([b"w1", b"malformed", b"r1", b"after"]), Device(), []
    assert take(channels, 0, device, kept, batch=8) == (3, False)
    assert device.performed == [b"w1"] and [r.data for _, r in kept] == [b"r1"]
    assert channels.requests[0] == [b"after"]


def test_take_answers_an_acknowledged_write_at_once_and_stops():
    channels, device, kept = Channels([b"a1", b"after"]), Device(), []
    assert take(channels, 0, device, kept, batch=8) == (1, False)
    assert channels.replies == [(0, b"ok a1")] and kept == []


def test_take_says_when_a_batch_was_filled():
    channels, device = Channels([b"w"] * 10), Device()
    assert take(channels, 0, device, [], batch=8) == (8, True)


def test_reads_wait_for_every_other_channel_up_to_its_depth():
    channels = Channels([b"never"], [b"w"] * 12, [], [b"w2", b"r2"])
    device, kept = Device(), [(0, Record(b"r0"))]  # vCPU 0's read, taken: nothing behind it is touched
    answer_reads(channels, device, kept, channels.ready_now, lambda i: take(channels, i, device, kept, 10), vcpus=4)
    assert device.performed == [b"w"] * 10 + [b"w2", b"r0", b"r2"]  # a read found meanwhile waits too
    assert channels.replies == [(0, b"ok r0"), (3, b"ok r2")]
    assert channels.requests[0] == [b"never"] and kept == []


def test_one_vcpu_is_in_order_already():
    channels, device = Channels([b"w"]), Device()
    kept = [(0, Record(b"r0"))]
    answer_reads(channels, device, kept, channels.ready_now, lambda i: take(channels, i, device, kept, 10), vcpus=1)
    assert device.performed == [b"r0"] and channels.requests[0] == [b"w"]


# --- Both transports, the device model's perform and KVM's coalesced ring. ---

PORT = 0x520


class Log:
    """A device that logs what reaches it, in order."""

    kernel_access = NO_KERNEL_ACCESS

    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append("read")
        return 0

    def write(self, offset, size, value):
        self.log.append(value)

    def stats(self):
        return {}


def _queue_depth():
    with open("/proc/sys/fs/mqueue/msg_max") as f:
        return min(10, int(f.read()))


class RingEnds:
    def __init__(self, vcpus):
        self.area = RingArea.create(vcpus)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.server = RingServer(RingArea.attach(os.dup(self.area.fd)), os.dup(self.wake_fd), poll_limit=0.0)
        self.channels = [RingChannel(self.area.requests(i), self.area.replies(i), self.area.header, self.wake_fd)
                         for i in range(vcpus)]

    def send(self, vcpu, record):
        class Counts:
            posted_stalls = server_wakeups = reply_sleeps = 0

        assert self.channels[vcpu].send(record, Counts(), lambda: False)

    def reply(self, vcpu):
        return self.area.replies(vcpu).pop()

    def close(self):
        self.server.close()
        self.channels = []
        self.area.close()
        os.close(self.wake_fd)


class QueueEnds:
    def __init__(self, vcpus):
        prefix = f"/mpvmm-test-{os.getpid()}-{secrets.token_hex(4)}"
        names = [f"{prefix}-{kind}{i}" for kind in ("req", "rep") for i in range(vcpus)]
        self.queues = [posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o600, max_messages=_queue_depth(),
                                              max_message_size=MAX_MESSAGE_SIZE) for name in names]
        self.server = QueueServer(names[:vcpus], names[vcpus:])  # unlinks every name
        self.vcpus = vcpus

    def send(self, vcpu, record):
        self.queues[vcpu].send(record)

    def reply(self, vcpu):
        queue = self.queues[self.vcpus + vcpu]
        return queue.receive(0)[0] if queue.current_messages else None

    def close(self):
        self.server.close()
        for queue in self.queues:
            queue.close()


@pytest.fixture(params=["ring", "mq"])
def ends(request, kvm_available):
    if request.param == "mq" and _queue_depth() < 10:
        pytest.skip("needs queues of depth 10 (fs.mqueue.msg_max)")
    made = (RingEnds if request.param == "ring" else QueueEnds)(2)
    yield made
    made.close()


@pytest.fixture
def device_model():
    """The device model's server (rounds.Device) over a logging device and a coalesced ring page of our own."""
    device, pio = Log(), Bus("pio")
    pio.insert(BusRange(PORT, 8), device, "log")
    server = DeviceModelServer(control=None, parent=os.getpid())
    server.model = DeviceModel(machine=(pio, Bus("mmio"), {"log": device}))
    page = mmap.mmap(-1, mmap.PAGESIZE)
    server.coalesced = CoalescedRing(page)
    kvm = CoalescedProducer(page)
    yield server, device, kvm
    kvm.header = None
    server.coalesced.close()


def test_a_read_is_answered_after_every_write_queued_before_it_by_any_vcpu(ends, device_model):
    """vCPU 0: writes through KVM's ring, then more posted writes than a batch; vCPU 1: a read.

    The round starts with vCPU 1, so its read is the first request taken: it
    is still answered after all of them, the coalesced ones first.
    """
    server, device, kvm = device_model
    for value in (1, 2):
        assert kvm.write(PORT, 4, value, pio=True)
    posted = list(range(3, 3 + PER_VCPU_BATCH + 1))
    for value in posted:
        ends.send(0, encode_request(KIND_WRITE, 0, SPACE_PIO, PORT, 4, value, 0))
    ends.send(1, encode_request(KIND_READ, 1, SPACE_PIO, PORT, 4, 0, 7))
    ends.server._rounds = 1  # the rotation starts at vCPU 1
    while ends.server.serve(set(ends.server.fds()), server):
        pass
    assert device.log == [1, 2, *posted, "read"]
    assert decode_reply(ends.reply(1)) == (7, 0)
    assert ends.server.received == [len(posted), 1]


def test_a_full_rings_fallback_write_follows_the_ring_and_is_acknowledged(ends, device_model):
    server, device, kvm = device_model
    assert kvm.write(PORT, 4, 1, pio=True)
    ends.send(0, encode_request(KIND_WRITE_ACKED, 0, SPACE_PIO, PORT, 4, 2, 5))
    ends.server.serve(set(ends.server.fds()), server)
    assert device.log == [1, 2] and decode_reply(ends.reply(0)) == (5, 0)
