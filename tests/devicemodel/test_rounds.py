"""The device model's request order (rounds.py): every vCPU's requests performed in stamp order.

First the rule on fake channels; then both real transports (shared-memory
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
from mpvmm.devicemodel.rounds import StampOrder
from mpvmm.transport.channel import RequestOrder, RingChannel
from mpvmm.transport.ring import RingArea
from mpvmm.transport.server import PER_VCPU_BATCH, QueueServer, RingServer
from tests.devicemodel.test_coalesced import Kvm as CoalescedProducer

# --- The rule, on fake channels. ---


class Record:
    """A fake request: ``b"name@stamp"`` (no stamp: 0); names starting with r are reads."""

    def __init__(self, data):
        self.data = data
        self.is_read = data.startswith(b"r")
        self.seq = int(data.rsplit(b"@", 1)[1]) if b"@" in data else 0


class Channels:
    """Request lists per vCPU; ``arrivals[(index, record)]`` lands in a channel when that record is popped."""

    def __init__(self, *requests, arrivals=None):
        self.requests = [list(r) for r in requests]
        self.arrivals = dict(arrivals or {})
        self.replies = []

    def pop(self, index):
        if not self.requests[index]:
            return None
        record = self.requests[index].pop(0)
        for (channel, after), arriving in list(self.arrivals.items()):
            if after == record:
                self.requests[channel].append(arriving)
        return record

    def reply(self, index, record):
        self.replies.append((index, record))

    def ready_now(self):
        return [index for index, requests in enumerate(self.requests) if requests]


class Device:
    """Performs in order; reads and acknowledged writes (b"a...") are answered."""

    def __init__(self):
        self.performed = []

    def decode(self, record):
        return None if record.startswith(b"malformed") else Record(record)

    def perform(self, request):
        self.performed.append(request.data)
        return b"ok " + request.data if request.is_read or request.data.startswith(b"a") else None


def drain(channels, vcpus, counts=None):
    device = Device()
    order = StampOrder(channels, device, vcpus)
    while (taken := order.next()) is not None:
        device.perform(taken[1])
    if counts is not None:
        counts["reordered"] = order.reordered
    return device.performed


def test_requests_of_every_vcpu_are_performed_in_stamp_order():
    channels = Channels([b"w@1", b"w@4", b"w@5"], [b"w@2", b"r@3"], [b"w@6"])
    assert drain(channels, 3) == [b"w@1", b"w@2", b"r@3", b"w@4", b"w@5", b"w@6"]


def test_the_later_vcpus_interrupt_enable_wins():
    """The UART stall the nested soak found: vCPU 0's handler turned the interrupt off (stamp 1), then
    vCPU 1 turned it on (stamp 2). Taken channel by channel, vCPU 1's came first and the later write
    lost; in stamp order the interrupt stays on."""
    channels = Channels([b"ier-on@2"], [b"ier-off@1"])
    counts = {}
    assert drain(channels, 2, counts)[-1] == b"ier-on@2"
    assert counts == {"reordered": 1}  # vCPU 0's write was taken first and performed second


def test_a_request_that_arrives_in_a_channel_already_looked_at_is_still_taken_first():
    """vCPU 0's request (stamp 1) reaches its channel only after that channel was found empty and vCPU
    1's later request was taken; the second look finds it before anything is performed."""
    channels = Channels([], [b"w@2"], arrivals={(0, b"w@2"): b"w@1"})
    assert drain(channels, 2) == [b"w@1", b"w@2"]


def test_a_second_look_that_finds_a_smaller_stamp_looks_again():
    """Each smaller stamp found makes the candidate and another look: w@1 arrives while w@2 is taken."""
    channels = Channels([], [], [b"w@3"], arrivals={(1, b"w@3"): b"w@2", (0, b"w@2"): b"w@1"})
    assert drain(channels, 3) == [b"w@1", b"w@2", b"w@3"]


def test_malformed_records_are_dropped_and_each_channel_keeps_its_order():
    channels = Channels([b"malformed", b"w@2", b"malformed", b"w@3"], [b"w@1"])
    assert drain(channels, 2) == [b"w@1", b"w@2", b"w@3"]


def test_one_vcpu_is_taken_as_it_comes():
    """One channel is already in order: no second look (its stamps need not even grow)."""
    assert drain(Channels([b"w@5", b"r@1"]), 1) == [b"w@5", b"r@1"]


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
        self.order = RequestOrder()
        self.channels = [RingChannel(self.area.requests(i), self.area.replies(i), self.area.header, self.wake_fd,
                                     self.order)
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
        self.order.close()
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


def test_a_read_is_answered_after_every_write_made_before_it_by_any_vcpu(ends, device_model):
    """vCPU 0: writes through KVM's ring, then more posted writes than a batch; vCPU 1: a read made after them.

    vCPU 1's read is in its channel before vCPU 0's writes are (sent first in
    real time): it is still performed after all of them, the coalesced ones first.
    """
    server, device, kvm = device_model
    for value in (1, 2):
        assert kvm.write(PORT, 4, value, pio=True)
    posted = list(range(3, 3 + PER_VCPU_BATCH + 1))
    ends.send(1, encode_request(KIND_READ, 1, SPACE_PIO, PORT, 4, 0, len(posted) + 1))
    for stamp, value in enumerate(posted, 1):
        ends.send(0, encode_request(KIND_WRITE, 0, SPACE_PIO, PORT, 4, value, stamp))
    while ends.server.serve(set(ends.server.fds()), server):
        pass
    assert device.log == [1, 2, *posted, "read"]
    assert decode_reply(ends.reply(1)) == (len(posted) + 1, 0)
    assert ends.server.received == [len(posted), 1]


def test_two_vcpus_writes_are_performed_in_the_order_they_were_made(ends, device_model):
    """vCPU 1 wrote first (stamp 1: its interrupt handler turned the UART's interrupt off) and vCPU 0
    second (stamp 2: on again). Taken channel by channel from vCPU 0, as the rounds before stamps did,
    the interrupt ended off; in stamp order vCPU 0's value is the one that stays."""
    server, device, _kvm = device_model
    ends.send(1, encode_request(KIND_WRITE, 1, SPACE_PIO, PORT, 1, 0x05, 1))
    ends.send(0, encode_request(KIND_WRITE, 0, SPACE_PIO, PORT, 1, 0x07, 2))
    while ends.server.serve(set(ends.server.fds()), server):
        pass
    assert device.log == [0x05, 0x07]


def test_a_full_rings_fallback_write_follows_the_ring_and_is_acknowledged(ends, device_model):
    server, device, kvm = device_model
    assert kvm.write(PORT, 4, 1, pio=True)
    ends.send(0, encode_request(KIND_WRITE_ACKED, 0, SPACE_PIO, PORT, 4, 2, 5))
    ends.server.serve(set(ends.server.fds()), server)
    assert device.log == [1, 2] and decode_reply(ends.reply(0)) == (5, 0)
