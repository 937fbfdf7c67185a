"""The device-model process, end to end: real shm, real queues, a real child."""

import fcntl
import mmap
import os
import secrets
import select
import signal
import socket
import subprocess
import struct
import sys
import termios
import time
import tty
from pathlib import Path

import msgpack
import posix_ipc
import pytest

from mpvmm.devicemodel import rtc, serial
from mpvmm.devicemodel.devices import testdev_pattern
from mpvmm.devicemodel.host_console import HostConsole
from mpvmm.devicemodel.config import Config
from mpvmm.devicemodel.protocol import (
    KIND_READ,
    KIND_WRITE,
    KIND_WRITE_ACKED,
    MAX_MESSAGE_SIZE,
    SPACE_MMIO,
    SPACE_PIO,
    decode_reply,
    encode_request,
)
from mpvmm.errors import DeviceModelError
from mpvmm.transport.channel import RequestOrder, RingChannel
from mpvmm.transport.ring import RING_SLOTS, RingArea
from mpvmm.x86.layout import (COM1_PORT, MMIO_TESTDEV_ADDR, MMIO_TESTDEV_DOORBELL_ADDR, PIO_TESTDEV_DOORBELL_PORT,
                              PIO_TESTDEV_PORT, RTC_PORT)
from tests.devicemodel.test_coalesced import Kvm as CoalescedProducer

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
RAM_SIZE = 1 << 20


def queue_depth():
    with open("/proc/sys/fs/mqueue/msg_max") as f:
        return min(10, int(f.read()))


class _Counts:
    """The stats-page counters a RingChannel bumps (the harness has no stats page)."""

    posted_stalls = server_wakeups = reply_sleeps = 0


class Harness:
    """What the supervisor does: names, shm, queues or rings, socketpair, the child."""

    def __init__(self, vcpus=2, transport="mq"):
        self.transport = transport
        self.vcpus = vcpus
        self.prefix = f"/mpvmm-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.req_names = [f"{self.prefix}-req{i}" for i in range(vcpus)]
        self.rep_names = [f"{self.prefix}-rep{i}" for i in range(vcpus)]
        # Like GuestMemory: nameless at once, handed over as an fd.
        self.shm = posix_ipc.SharedMemory(self.prefix + "-ram", posix_ipc.O_CREX, mode=0o600, size=RAM_SIZE)
        self.shm.unlink()
        self.requests, self.replies, self.channels = [], [], []
        self.area, self.wake_fd = None, -1
        self.inherited = [self.shm.fd]
        if transport == "mq":
            depth = queue_depth()
            self.requests = [self._create_queue(name, depth) for name in self.req_names]
            self.replies = [self._create_queue(name, depth) for name in self.rep_names]
        else:
            self.area = RingArea.create(vcpus)
            self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.order = RequestOrder()
            self.channels = [RingChannel(self.area.requests(i), self.area.replies(i), self.area.header,
                                         self.wake_fd, self.order) for i in range(vcpus)]
            self.inherited += [self.area.fd, self.wake_fd]
        self.proc = None
        self.sock = None
        self._unpacker = msgpack.Unpacker(raw=False)

    @staticmethod
    def _create_queue(name, depth):
        return posix_ipc.MessageQueue(
            name, posix_ipc.O_CREX, mode=0o600, max_messages=depth, max_message_size=MAX_MESSAGE_SIZE
        )

    @property
    def depth(self):
        """Replies a vCPU's reply channel holds."""
        return queue_depth() if self.transport == "mq" else RING_SLOTS

    def start(self, stdout=subprocess.DEVNULL, module="mpvmm.devicemodel", args=(), pass_fds=(), prefix=()):
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", module, str(child.fileno()), *args],
            pass_fds=(child.fileno(), *self.inherited, *pass_fds),
            stdout=stdout,
            env=env,
        )
        child.close()
        self.sock.settimeout(TIMEOUT)

    def configure(self, console=None, **changes):
        if self.transport == "mq":
            transport = {"request_queues": self.req_names, "reply_queues": self.rep_names}
        else:
            transport = {"transport": "ring", "ring_fd": self.area.fd, "wake_fd": self.wake_fd,
                         "poll_limit_seconds": 0.0002}
        message = {
            "op": "configure",
            "version": 1,
            "ram_fd": self.shm.fd,
            "ram_size": RAM_SIZE,
            "console": console,
            **transport,
            **changes,
        }
        self.send(message)
        return self.recv()

    def send(self, message):
        self.sock.sendall(msgpack.packb(message))

    def recv(self):
        while True:
            for message in self._unpacker:
                return message
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("device model closed the control socket")
            self._unpacker.feed(data)

    def send_raw(self, vcpu, record):
        """One record on vCPU ``vcpu``'s request channel, as it is, malformed or not."""
        if self.transport == "mq":
            self.requests[vcpu].send(record)
        else:
            assert self.channels[vcpu].send(record, _Counts(), lambda: False)

    def request(self, vcpu, *args):
        self.send_raw(vcpu, encode_request(*args))

    def reply(self, vcpu):
        if self.transport == "mq":
            message, _ = self.replies[vcpu].receive(TIMEOUT)
            return decode_reply(message)
        deadline = time.monotonic() + TIMEOUT
        while (message := self.channels[vcpu].receive(_Counts())) is None:
            assert time.monotonic() < deadline, "no reply"
        return decode_reply(message)

    def replies_waiting(self, vcpu):
        return self.replies[vcpu].current_messages if self.transport == "mq" else len(self.area.replies(vcpu))

    def stats(self):
        self.send({"op": "stats"})
        message = self.recv()
        assert message["op"] == "stats"
        return message

    def unlink_names(self):
        """What the supervisor's close() does with names a failed start left."""
        for name in self.req_names + self.rep_names:
            try:
                posix_ipc.unlink_message_queue(name)
            except posix_ipc.ExistentialError:
                pass

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.sock is not None:
            self.sock.close()
        for queue in self.requests + self.replies:
            queue.close()
        self.unlink_names()
        self.shm.close_fd()
        if self.area is not None:
            self.channels = []
            self.area.close()
            self.order.close()
            os.close(self.wake_fd)

    def leftovers(self):
        shm_left = [p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(self.prefix[1:])]
        queues_left = []
        for name in self.req_names + self.rep_names:
            try:
                posix_ipc.MessageQueue(name).close()
                queues_left.append(name)
            except posix_ipc.ExistentialError:
                pass
        return shm_left + queues_left


@pytest.fixture(params=["mq", "ring"])
def harness(request):
    h = Harness(transport=request.param)
    yield h
    h.close()
    assert h.leftovers() == []


@pytest.fixture
def mq_harness():
    h = Harness(transport="mq")
    yield h
    h.close()
    assert h.leftovers() == []


def test_full_session(harness, tmp_path):
    console = tmp_path / "console.log"
    harness.start()
    ready = harness.configure(console=str(console))
    assert ready["op"] == "ready" and ready["pid"] == harness.proc.pid
    # The device model unlinked every queue name as it opened it.
    assert harness.leftovers() == []

    for byte in b"hello\n":  # posted writes, no replies
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, COM1_PORT, 1, byte, 0)
    harness.request(0, KIND_WRITE, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 5, 0)
    harness.request(0, KIND_WRITE, 0, SPACE_PIO, PIO_TESTDEV_PORT, 1, 7, 0)
    harness.request(0, KIND_READ, 0, SPACE_PIO, PIO_TESTDEV_PORT + 2, 2, 0, 1)
    assert harness.reply(0) == (1, testdev_pattern(2, 2))
    harness.request(1, KIND_READ, 1, SPACE_PIO, 0x2F8, 4, 0, 7)  # unmapped port
    assert harness.reply(1) == (7, 0xFFFFFFFF)
    harness.request(1, KIND_READ, 1, SPACE_MMIO, MMIO_TESTDEV_ADDR + 8, 8, 0, 8)
    assert harness.reply(1) == (8, testdev_pattern(8, 8))
    # A message that claims another vCPU still answers on its own queue pair.
    harness.request(0, KIND_READ, 1, SPACE_PIO, PIO_TESTDEV_PORT, 1, 0, 2)
    assert harness.reply(0) == (2, testdev_pattern(0, 1))
    assert harness.replies_waiting(1) == 0

    harness.send_raw(1, b"\xc1")  # malformed
    harness.send_raw(1, msgpack.packb([9, 1, 1, 0, 0, 1, 0, 9]))  # bad version, a read
    harness.send_raw(1, b"")
    # Queues are FIFO: once this read is answered the bad ones were handled.
    harness.request(1, KIND_READ, 1, SPACE_PIO, PIO_TESTDEV_PORT, 1, 0, 9)
    assert harness.reply(1) == (9, testdev_pattern(0, 1))
    assert harness.proc.poll() is None

    reply = harness.stats()
    stats = reply["stats"]
    assert reply["pid"] == harness.proc.pid
    assert stats["rejected"]["malformed"] == 1
    assert stats["rejected"]["bad_version"] == 1
    assert stats["rejected"]["truncated"] == 1
    assert stats["unmapped"]["pio"] == {"read": 1, "write": 0}
    assert {k: stats["devices"]["testdev-pio"][k] for k in ("writes", "write_sum", "reads")} == \
        {"writes": 2, "write_sum": 12, "reads": 3}
    assert stats["devices"]["testdev-mmio"]["reads"] == 1
    assert stats["requests"]["com1"]["write"] == 6
    assert reply["process"]["received"] == [10, 6]
    assert reply["process"]["replies_sent"] == 5

    harness.send({"op": "shutdown"})
    bye = harness.recv()
    assert bye["op"] == "bye"
    assert bye["stats"]["devices"]["com1"]["out_bytes"] == 6
    assert harness.proc.wait(TIMEOUT) == 0
    assert console.read_bytes() == b"hello\n"


def test_the_rtc_update_interrupt_arrives_with_no_guest_access(harness):
    """The process wakes for the RTC's update cycle on its own and signals the RTC's irqfd."""
    irqfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        harness.start(pass_fds=(irqfd,))
        assert harness.configure(machine="pc", irqfds={"rtc": irqfd})["op"] == "ready"
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, RTC_PORT, 1, rtc.REG_STATUS_B, 0)
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, RTC_PORT + 1, 1, rtc.STATUS_B_24H | rtc.STATUS_B_UIE, 0)
        ready, _, _ = select.select([irqfd], [], [], 3.0)  # the next whole second, and a margin
        assert ready == [irqfd] and os.eventfd_read(irqfd) == 1
        assert harness.stats()["stats"]["devices"]["rtc"]["interrupts"] == 1
    finally:
        os.close(irqfd)


def rtc_write(harness, register, value):
    harness.request(0, KIND_WRITE, 0, SPACE_PIO, RTC_PORT, 1, register, 0)
    harness.request(0, KIND_WRITE, 0, SPACE_PIO, RTC_PORT + 1, 1, value, 0)


def test_a_pending_and_an_armed_rtc_alarm_move_to_another_device_model(harness):
    """Saved with its alarm flagged and armed (every second), the RTC goes on in a new process.

    The new device model keeps the pending flags for the guest's handler to
    read, and raises the next alarm on its own irqfd with no guest access,
    but only once released: before, the supervisor is still writing the
    interrupt controllers, which would lose it.
    """
    first, second = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
    other = Harness()
    try:
        harness.start(pass_fds=(first,))
        assert harness.configure(machine="pc", irqfds={"rtc": first})["op"] == "ready"
        for register in (rtc.REG_SECONDS_ALARM, rtc.REG_MINUTES_ALARM, rtc.REG_HOURS_ALARM):
            rtc_write(harness, register, rtc.ALARM_ANY)
        rtc_write(harness, rtc.REG_STATUS_B, rtc.STATUS_B_24H | rtc.STATUS_B_AIE)
        assert select.select([first], [], [], 3.0)[0] == [first], "no alarm before the save"
        harness.send({"op": "save_state"})
        saved = harness.recv()["devices"]
        pending = rtc.STATUS_C_IRQF | rtc.STATUS_C_AF
        assert saved["rtc"]["flags"] & pending == pending

        other.start(pass_fds=(second,))
        assert other.configure(machine="pc", irqfds={"rtc": second})["op"] == "ready"
        other.send({"op": "restore_state", "devices": saved})
        assert other.recv() == {"op": "restored"}
        other.request(0, KIND_WRITE, 0, SPACE_PIO, RTC_PORT, 1, rtc.REG_STATUS_C, 0)
        other.request(0, KIND_READ, 0, SPACE_PIO, RTC_PORT + 1, 1, 0, 7)
        seq, flags = other.reply(0)
        assert seq == 7 and flags & pending == pending  # the alarm flagged before the save
        assert select.select([second], [], [], 1.5)[0] == [], "an alarm (one a second) came before the release"
        other.send({"op": "release"})
        assert select.select([second], [], [], 3.0)[0] == [second], "the armed alarm did not fire after the restore"
        assert other.stats()["stats"]["devices"]["rtc"]["interrupts"] > saved["rtc"]["interrupts"]
    finally:
        other.close()
        os.close(first)
        os.close(second)
    assert other.leftovers() == []


def test_terminal_input_typed_before_a_restore_reaches_the_restored_uart_once_released(harness):
    """A restored VM's device model reads the terminal before its devices are restored: what it
    read reaches the saved UART, and raises its interrupt only after ``release`` (the
    supervisor sends it once the interrupt controllers are written, which would lose it)."""
    com1 = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    terminal, follower = os.openpty()
    tty.setraw(follower)
    try:
        harness.start(pass_fds=(com1, follower))
        assert harness.configure(machine="pc", irqfds={"com1": com1}, stdin_fd=follower)["op"] == "ready"
        harness.send({"op": "save_state"})
        saved = harness.recv()["devices"]
        saved["com1"]["ier"] = serial.IER_RDA_BIT  # as the guest's driver left it
        typed = b"typed while the restored VM was being built\r"
        os.write(terminal, typed)
        deadline = time.monotonic() + TIMEOUT
        while struct.unpack("i", fcntl.ioctl(follower, termios.FIONREAD, b"\0" * 4))[0]:
            assert time.monotonic() < deadline, "the device model does not read the terminal"
            time.sleep(0.01)
        harness.send({"op": "restore_state", "devices": saved})
        assert harness.recv() == {"op": "restored"}
        assert select.select([com1], [], [], 0.5)[0] == [], "the UART's interrupt came before release"
        harness.send({"op": "release"})
        assert select.select([com1], [], [], 3.0)[0] == [com1], "no UART interrupt after release"
        received = bytearray()
        for sequence in range(1, len(typed) + 1):
            harness.request(0, KIND_READ, 0, SPACE_PIO, COM1_PORT, 1, 0, sequence)
            received.append(harness.reply(0)[1])
        assert bytes(received) == typed
    finally:
        for fd in (com1, terminal, follower):
            os.close(fd)


def test_shutdown_drains_posted_writes_first(harness, tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"before\n")  # appended to, not truncated
    harness.start()
    assert harness.configure(console=str(console))["op"] == "ready"
    for byte in b"late\n":
        harness.request(1, KIND_WRITE, 1, SPACE_PIO, COM1_PORT, 1, byte, 0)
    harness.send({"op": "shutdown"})
    assert harness.recv()["op"] == "bye"
    assert harness.proc.wait(TIMEOUT) == 0
    assert console.read_bytes() == b"before\nlate\n"


def test_eof_on_control_socket_ends_the_process(harness):
    harness.start(stdout=subprocess.PIPE)
    assert harness.configure(console=None)["op"] == "ready"
    for byte in b"to stdout\n":
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, COM1_PORT, 1, byte, 0)
    harness.request(0, KIND_READ, 0, SPACE_PIO, PIO_TESTDEV_PORT, 1, 0, 1)
    assert harness.reply(0)[0] == 1
    harness.sock.close()
    harness.sock = None
    assert harness.proc.wait(TIMEOUT) == 0
    assert harness.proc.stdout.read() == b"to stdout\n"
    harness.proc.stdout.close()


def test_eof_before_configure_exits_quietly(harness):
    harness.start()
    harness.sock.close()
    harness.sock = None
    assert harness.proc.wait(TIMEOUT) == 0


def test_configure_failure_reports_and_exits_1(harness):
    harness.start()
    answer = harness.configure(ram_fd=999)  # not an fd the child inherited
    assert answer["op"] == "error"
    assert "guest RAM fd 999" in answer["message"]
    assert harness.proc.wait(TIMEOUT) == 1


def test_configure_with_too_small_ram_fails(harness):
    harness.start()
    answer = harness.configure(ram_size=RAM_SIZE * 2)
    assert answer["op"] == "error" and f"holds {RAM_SIZE} bytes" in answer["message"]
    assert harness.proc.wait(TIMEOUT) == 1


def test_configure_with_a_missing_queue_fails(mq_harness):
    mq_harness.start()
    answer = mq_harness.configure(reply_queues=mq_harness.rep_names[:1] + [mq_harness.prefix + "-nope"])
    assert answer["op"] == "error" and "nope" in answer["message"]
    assert mq_harness.proc.wait(TIMEOUT) == 1


def test_sigint_is_ignored_and_unknown_ops_answered(harness):
    harness.start()
    assert harness.configure()["op"] == "ready"
    harness.proc.send_signal(signal.SIGINT)
    harness.send({"op": "frobnicate"})
    assert harness.recv()["op"] == "error"
    harness.send(["not", "a", "map"])
    assert harness.recv()["op"] == "error"
    assert harness.configure() == {"op": "error", "message": "already configured"}
    assert harness.stats()["op"] == "stats"
    assert harness.proc.poll() is None


def test_full_reply_queue_drops_and_counts(harness):
    harness.start()
    assert harness.configure()["op"] == "ready"
    depth = harness.depth
    for seq in range(depth + 1):  # one more read than the reply queue holds
        harness.request(1, KIND_READ, 1, SPACE_PIO, PIO_TESTDEV_PORT, 1, 0, seq)
    deadline = time.monotonic() + TIMEOUT
    while harness.stats()["process"]["received"][1] < depth + 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process = harness.stats()["process"]
    assert process["replies_sent"] == depth and process["replies_dropped"] == 1
    assert [harness.reply(1)[0] for _ in range(depth)] == list(range(depth))
    assert harness.proc.poll() is None


def _ring_page():
    """A stand-in for the vCPU fd the supervisor passes: a memfd whose third page holds the ring."""
    fd = os.memfd_create("coalesced-ring")
    os.ftruncate(fd, 3 * mmap.PAGESIZE)
    return fd, mmap.mmap(fd, mmap.PAGESIZE, offset=2 * mmap.PAGESIZE)


def _stats_until(harness, done):
    deadline = time.monotonic() + TIMEOUT
    while not done(stats := harness.stats()):
        assert time.monotonic() < deadline, stats
        time.sleep(0.01)
    return stats


def test_coalesced_writes_are_drained_in_order_before_requests(harness):
    fd, page = _ring_page()
    kvm = CoalescedProducer(page)
    try:
        harness.start(pass_fds=(fd,))
        assert harness.configure(coalesced_ring=[fd, 2])["op"] == "ready"
        harness.proc.send_signal(signal.SIGSTOP)  # nothing drains while we fill
        for sequence in (1, 2, 3):  # vCPU 0's first writes, through KVM's ring
            assert kvm.write(PIO_TESTDEV_PORT, 4, sequence, pio=True)
        harness.request(0, KIND_WRITE_ACKED, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 4, 1)  # a full ring's fallback
        harness.proc.send_signal(signal.SIGCONT)
        assert harness.reply(0) == (1, 0)
        assert kvm.write(PIO_TESTDEV_PORT, 4, 5, pio=True)  # after the acknowledgement: on through the ring
        stats = _stats_until(harness, lambda s: s["process"]["coalesced_ring"]["entries"] == 4)  # the <= 1 ms drain
        device = stats["stats"]["devices"]["testdev-pio"]
        assert (device["writes"], device["write_sum"], device["order_errors"]) == (5, 15, 0)
        assert stats["stats"]["coalesced"]["testdev-pio"] == 4
        assert stats["stats"]["requests"]["testdev-pio"] == {"read": 0, "write": 1}
        assert kvm.header.first == kvm.header.last == 4
    finally:
        kvm.header = None
        page.close()
        os.close(fd)


def test_doorbells_are_counted_by_device(harness):
    pio_bell, mmio_bell = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        harness.start(pass_fds=(pio_bell, mmio_bell))
        assert harness.configure(doorbells=[[pio_bell, SPACE_PIO, PIO_TESTDEV_DOORBELL_PORT],
                                            [mmio_bell, SPACE_MMIO, MMIO_TESTDEV_DOORBELL_ADDR]])["op"] == "ready"
        os.eventfd_write(pio_bell, 3)  # what KVM does for three rings
        os.eventfd_write(mmio_bell, 1)
        os.eventfd_write(mmio_bell, 1)
        stats = _stats_until(harness, lambda s: sum(s["stats"]["doorbells"].values()) == 5)["stats"]
        assert stats["doorbells"]["testdev-pio"] == stats["devices"]["testdev-pio"]["doorbells"] == 3
        assert stats["doorbells"]["testdev-mmio"] == stats["devices"]["testdev-mmio"]["doorbells"] == 2
    finally:
        os.close(pio_bell)
        os.close(mmio_bell)


@pytest.mark.parametrize("changes, message", [
    ({"transport": "pigeon"}, "unknown transport"),
    ({"doorbells": [[3, 9, 0]]}, "doorbells"),
    ({"coalesced_ring": [3]}, "coalesced_ring"),
    ({"transport": "ring", "ring_fd": None}, "ring_fd and wake_fd"),
])
def test_configure_refuses_bad_transport_and_in_kernel_fields(harness, changes, message):
    harness.start()
    answer = harness.configure(**changes)
    assert answer["op"] == "error" and message in answer["message"], answer
    assert harness.proc.wait(TIMEOUT) == 1


@pytest.mark.parametrize("bad", ["area", "poll limit"])
def test_a_bad_ring_area_or_poll_limit_is_refused(bad):
    harness = Harness(transport="ring")
    fake = os.memfd_create("not-rings")
    os.ftruncate(fake, harness.area.size)
    try:
        harness.start(pass_fds=(fake,))
        if bad == "area":
            answer = harness.configure(ring_fd=fake)
            assert answer["op"] == "error" and "not a version 1 ring area" in answer["message"]
        else:
            answer = harness.configure(poll_limit_seconds=5.0)  # polling is bounded far below that
            assert answer["op"] == "error" and "poll_limit_seconds" in answer["message"]
        assert harness.proc.wait(TIMEOUT) == 1
    finally:
        os.close(fake)
        harness.close()
    assert harness.leftovers() == []


def test_usage_error_exit_2():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-m", "mpvmm.devicemodel"], env=env, capture_output=True)
    assert result.returncode == 2 and b"usage" in result.stderr


# --- The pieces, without a child process. ---


def test_a_read_sees_every_write_queued_before_it_by_another_vcpu(harness):
    """vCPU 0 posts nine scratch-register writes, vCPU 1 then reads it: it must see the ninth.

    Everything is queued before the device model starts, so its first round
    takes a batch of eight from queue 0 and then the read from queue 1.
    """
    if queue_depth() < 10:
        pytest.skip("needs queues of depth 10 (fs.mqueue.msg_max)")
    scratch = COM1_PORT + 7
    for value in range(1, 10):
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, scratch, 1, value, 0)
    harness.request(1, KIND_READ, 1, SPACE_PIO, scratch, 1, 0, 1)
    harness.start()
    assert harness.configure()["op"] == "ready"
    assert harness.reply(1) == (1, 9)


def test_console_buffers_until_flush(tmp_path):
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    console = HostConsole(fd, owns_fd=True)
    console.write(b"a\n")
    assert path.read_bytes() == b""  # a file is not line-buffered
    console.flush()
    assert path.read_bytes() == b"a\n"
    console.write(b"x" * 5000)  # a large backlog flushes by itself
    assert path.stat().st_size == 5002
    console.close()
    assert console.stats() == {"written_bytes": 5002, "lost_bytes": 0, "write_errors": 0, "error": None}


def test_console_on_a_tty_flushes_each_line():
    master, slave = os.openpty()
    try:
        console = HostConsole(slave, owns_fd=False)
        console.write(b"ab")
        os.set_blocking(master, False)
        with pytest.raises(BlockingIOError):
            os.read(master, 100)
        console.write(b"\n")
        select.select([master], [], [], TIMEOUT)
        assert os.read(master, 100).replace(b"\r", b"") == b"ab\n"
    finally:
        os.close(master)
        os.close(slave)


def test_console_write_errors_are_counted():
    read_end, write_end = os.pipe()
    os.close(read_end)
    console = HostConsole(write_end, owns_fd=True)
    console.write(b"lost")
    console.flush()  # EPIPE (SIGPIPE is ignored by Python)
    console.write(b"gone")
    console.flush()
    assert console.stats() == {"written_bytes": 0, "lost_bytes": 8, "write_errors": 2, "error": "Broken pipe"}
    console.close()


def test_console_on_a_full_device_counts_every_lost_byte():
    console = HostConsole(os.open("/dev/full", os.O_WRONLY), owns_fd=True)
    console.write(b"x" * 5000)  # each past the flush threshold: one write each
    console.write(b"y" * 5000)
    console.close()
    assert console.stats() == {"written_bytes": 0, "lost_bytes": 10000, "write_errors": 2,
                               "error": "No space left on device"}


GOOD_CONFIG = {
    "op": "configure",
    "version": 1,
    "ram_fd": 3,
    "ram_size": 4096,
    "request_queues": ["/a"],
    "reply_queues": ["/b"],
    "console": None,
}


def test_config_accepts_the_documented_message():
    config = Config.from_message(GOOD_CONFIG)
    assert config.request_queues == ("/a",) and config.console is None


@pytest.mark.parametrize(
    "change",
    [
        {"op": "stats"},
        {"version": 2},
        {"ram_size": 0},
        {"ram_size": "big"},
        {"ram_fd": None},
        {"ram_fd": -1},
        {"ram_fd": "/r"},
        {"request_queues": []},
        {"reply_queues": ["/b", "/c"]},
        {"request_queues": [1]},
        {"console": 5},
    ],
)
def test_config_refuses_bad_messages(change):
    with pytest.raises(DeviceModelError):
        Config.from_message({**GOOD_CONFIG, **change})
    with pytest.raises(DeviceModelError):
        Config.from_message("configure")


def test_save_state_sees_queued_writes_and_restore_state_rebuilds_the_devices(harness):
    harness.start()
    assert harness.configure()["op"] == "ready"
    for value in (3, 4):  # posted: still queued, maybe, when save_state arrives
        harness.request(0, KIND_WRITE, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, value, 0)
    harness.send({"op": "save_state"})
    saved = harness.recv()
    assert saved["op"] == "state"
    assert saved["devices"]["testdev-pio"] == {"writes": 2, "write_sum": 7, "reads": 0, "doorbells": 0,
                                               "doorbell_misses": 0, "order_errors": 0, "sequences": [[4, 0, 4]]}
    assert set(saved["devices"]) == set(harness.stats()["stats"]["devices"])

    devices = dict(saved["devices"], **{"testdev-pio": dict(saved["devices"]["testdev-pio"], writes=40,
                                                            write_sum=100, reads=1)})
    harness.send({"op": "restore_state", "devices": devices})
    assert harness.recv() == {"op": "restored"}
    harness.request(0, KIND_WRITE, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 5, 0)
    harness.request(0, KIND_READ, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 0, 1)
    assert harness.reply(0) == (1, testdev_pattern(0, 4))
    counts = harness.stats()["stats"]["devices"]["testdev-pio"]
    # The counts go on from the restored ones, and so does vCPU 0's sequence (4, then 5: in order).
    assert (counts["writes"], counts["write_sum"], counts["reads"], counts["order_errors"]) == (41, 105, 2, 0)

    # A bad record is refused and the machine stays as it was.
    harness.send({"op": "restore_state", "devices": dict(devices, **{"testdev-pio": {"writes": -1}})})
    refused = harness.recv()
    assert refused["op"] == "error" and "test device" in refused["message"]
    assert harness.stats()["stats"]["devices"]["testdev-pio"]["writes"] == 41
    assert harness.proc.poll() is None
