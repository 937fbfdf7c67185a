"""stop_and_join, the teardown every run and the raw bench rely on: every runner gone, or a clear error."""

import subprocess

import pytest

from mpvmm.errors import MpvmmError
from mpvmm.kvm.system import Kvm
from mpvmm.supervisor.builtin_guest import BuiltinGuestSource
from mpvmm.supervisor.guest_memory import GuestMemory
from mpvmm.supervisor.vcpu_host import RUNNERS
from mpvmm.vcpu_worker.route_table import paravirt_routes
from mpvmm.vcpu_worker.runner import VcpuSet, stop_and_join
from mpvmm.vcpu_worker.stats_page import StatsArea


class Runner:
    """A runner that leaves after ``stops_needed`` stop requests (never, for None)."""

    def __init__(self, index, stops_needed, killable):
        self.index = index
        self.stops_needed = stops_needed
        self.killable = killable
        self.stops = 0
        self.killed = False

    @property
    def done(self):
        return self.killed or (self.stops_needed is not None and self.stops >= self.stops_needed)

    def stop(self):
        self.stops += 1

    def join(self, timeout=None):
        return self.done

    def kill(self):
        self.killed = self.killable
        return self.killable


def test_each_runner_is_told_again_until_it_leaves():
    """A kick can land between a loop's check and its blocking call: the stop is repeated."""
    runners = [Runner(0, 1, False), Runner(1, 3, False)]
    stop_and_join(runners, timeout=5)
    assert [r.stops for r in runners] == [1, 3] and not any(r.killed for r in runners)


def test_a_finished_runner_is_not_stopped():
    runner = Runner(0, 0, False)
    stop_and_join([runner], timeout=5)
    assert runner.stops == 0


def test_a_stuck_process_is_killed():
    stuck = Runner(0, None, killable=True)
    stop_and_join([stuck], timeout=0.05)
    assert stuck.killed


def test_a_stuck_thread_is_an_error_naming_its_vcpu():
    with pytest.raises(MpvmmError, match=r"^vcpu 2 did not stop within 0.05 s$"):
        stop_and_join([Runner(0, 1, False), Runner(2, None, killable=False)], timeout=0.05)


def test_runners_never_started_are_joined_at_once(kvm_available):
    """A build that fails after the runners exist tears them down without waiting on anything.

    A process runner that never forked must not wait4(0), which would reap any child
    (the device model among them).
    """
    child = subprocess.Popen(["sleep", "5"])
    try:
        with Kvm() as kvm, GuestMemory(64 << 20) as memory, StatsArea(2) as stats:
            guest = BuiltinGuestSource(2, "pio-null", memory.size).load(memory)
            for name, host_class in RUNNERS.items():
                with host_class(kvm, memory, guest, 2) as host:
                    vcpus = VcpuSet(host.create_runners(stats, paravirt_routes(), [None, None]))
                    vcpus.stop_and_join(timeout=1)
                    assert vcpus.all_done(), name
        assert child.poll() is None  # not reaped by anyone but us
    finally:
        child.kill()
        child.wait()
