"""The Python run loop: _runloop.c's loop written in Python.

It exists as the baseline that shows what the GIL costs: every exit is
handled while holding the GIL, so vCPU threads take turns. It keeps the same
routes, messages, transports and stats page as the native loop and passes
the same tests. The process runner runs it too, in a process of its own.
"""

import ctypes
import ctypes.util
import errno
import threading
import time

from mpvmm.devicemodel import protocol
from mpvmm.errors import KvmIoctlError, ProtocolError
from mpvmm.kvm import bindings as kb
from mpvmm.vcpu_worker import route_table, stats_page
from mpvmm.vcpu_worker.outcome import LoopCode
from mpvmm.vcpu_worker.stats_page import LoopRequest, WorkerState

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_PR_SET_NAME = 15
KICK_POLL_SECONDS = 0.1  # as KICK_POLL_NS in _runloop.c
MAX_SLEEP_US = 1_000_000
_PATH_NATIVE, _PATH_POSTED, _PATH_SYNC, _PATH_FALLBACK = range(len(stats_page.PATHS))


class _Stop(Exception):
    """A stop was requested while the loop waited on the device model."""


class PythonLoop:
    """The state of one vCPU's Python run loop."""

    def __init__(self, index: int, vcpu, stats: stats_page.VcpuStats, routes: route_table.RouteTable, channel):
        self.index = index
        self.vcpu = vcpu
        self.stats = stats
        self.run = vcpu.kvm_run
        self.run_address = vcpu.run_address
        self.channel = channel
        self.routes = routes
        self.mmio_data_address = ctypes.addressof(self.run.mmio.data)

    def stop_requested(self) -> bool:
        return self.stats.request == LoopRequest.STOP

    def send(self, message: bytes) -> None:
        if not self.channel.send(message, self.stats, self.stop_requested):
            raise _Stop

    def sync_request(self, kind: int, space: int, address: int, size: int, value: int = 0) -> int:
        """A read, or an acknowledged write: send it and wait for the reply carrying our sequence number."""
        start = time.monotonic_ns()
        stamp = self.channel.next_stamp()
        self.send(protocol.encode_request(kind, self.index, space, address, size, value, stamp))
        while True:
            message = self.channel.receive(self.stats)
            if message is None:
                if self.stop_requested():
                    raise _Stop
                continue
            try:
                seq, value = protocol.decode_reply(message)
            except ProtocolError:
                seq = None
            if seq != stamp:
                self.stats.stale_replies += 1
                continue
            if kind == protocol.KIND_READ:
                elapsed = time.monotonic_ns() - start
                self.stats.sync_latency_buckets[stats_page.latency_bucket(elapsed)] += 1
                self.stats.sync_latency_sum_ns += elapsed
            return value

    def sleep(self, microseconds: int) -> None:
        start = time.monotonic_ns()
        end = start + min(microseconds, MAX_SLEEP_US) * 1000
        now = start
        while now < end and self.stats.request == LoopRequest.RUN:  # a pause cuts the rest short too
            time.sleep(min(end - now, KICK_POLL_SECONDS * 1e9) / 1e9)
            now = time.monotonic_ns()
        self.stats.sleep_ns += time.monotonic_ns() - start

    def access(self, space: int, address: int, size: int, is_write: bool, data_address: int):
        """One access; returns the debug-exit status when the guest asked to exit."""
        value = int.from_bytes(ctypes.string_at(data_address, size), "little") if is_write else 0
        action = self.routes.action(space, address)
        paths = self.stats.paths
        if action in route_table.NATIVE_ACTIONS:
            paths[_PATH_NATIVE] += 1
            if not is_write:
                ctypes.memset(data_address, 0, size)
            elif action == route_table.ACTION_SLEEP:
                self.sleep(value)
            elif action == route_table.ACTION_DEBUG_EXIT:
                return value
            return None
        if is_write and action == route_table.ACTION_COALESCED:
            # KVM's coalesced ring was full: acknowledged, so it cannot overtake the ring (_runloop.c).
            paths[_PATH_FALLBACK] += 1
            self.sync_request(protocol.KIND_WRITE_ACKED, space, address, size, value)
            return None
        if is_write:
            paths[_PATH_POSTED] += 1
            self.send(protocol.encode_request(protocol.KIND_WRITE, self.index, space, address, size, value,
                                              self.channel.next_stamp()))
            return None
        paths[_PATH_SYNC] += 1
        value = self.sync_request(protocol.KIND_READ, space, address, size)
        ctypes.memmove(data_address, value.to_bytes(size, "little"), size)
        return None

    def handle_io(self):
        io = self.run.io
        data = self.run_address + io.data_offset
        is_write = io.direction == kb.KVM_EXIT_IO_OUT
        for _ in range(io.count):
            status = self.access(route_table.SPACE_PIO, io.port, io.size, is_write, data)
            if status is not None:
                return status
            data += io.size
        return None

    def handle_mmio(self):
        mmio = self.run.mmio
        return self.access(route_table.SPACE_MMIO, mmio.phys_addr, mmio.len, bool(mmio.is_write), self.mmio_data_address)

    def wait_while_paused(self) -> None:
        self.stats.state = WorkerState.PAUSED
        while self.stats.request == LoopRequest.PAUSE:
            time.sleep(0.01)
        self.stats.state = WorkerState.RUNNING

    def loop(self) -> tuple[int, int]:
        stats, run, vcpu = self.stats, self.run, self.vcpu
        # As in _runloop.c: KVM finishes the last exit's instruction on the next KVM_RUN.
        exit_pending = False
        while True:
            request = stats.request
            if request == LoopRequest.STOP:
                return LoopCode.STOPPED, 0
            if request == LoopRequest.PAUSE:
                if not exit_pending:
                    self.wait_while_paused()
                    continue
                run.immediate_exit = 1  # complete the exit, run nothing, then pause
            try:
                reason = vcpu.run()
            except InterruptedError:  # a kick: clear the flag, then look at the request again
                run.immediate_exit = 0
                stats.interrupted += 1
                exit_pending = False
                continue
            except KvmIoctlError as err:
                if err.errno == errno.EAGAIN:
                    continue
                return LoopCode.ERROR, err.errno
            exit_pending = True
            stats.runs += 1
            stats.exits[min(reason, stats_page.STATS_EXIT_REASONS - 1)] += 1
            try:
                if reason == kb.KVM_EXIT_IO:
                    status = self.handle_io()
                elif reason == kb.KVM_EXIT_MMIO:
                    status = self.handle_mmio()
                elif reason == kb.KVM_EXIT_INTR:
                    status = None
                else:
                    return LoopCode.FAULT, reason
            except _Stop:
                return LoopCode.STOPPED, 0
            if status is not None:
                return LoopCode.EXITED, status


def run_python(index: int, vcpu, stats: stats_page.VcpuStats, routes: route_table.RouteTable,
               channel) -> tuple[int, int]:
    """Run ``vcpu`` on this thread until it stops; (LoopCode, value), as _runloop.run returns."""
    _libc.prctl(_PR_SET_NAME, f"vcpu{index}".encode(), 0, 0, 0)
    stats.tid = threading.get_native_id()
    stats.state = WorkerState.RUNNING
    return PythonLoop(index, vcpu, stats, routes, channel).loop()
