"""Live migration between real mpvmm processes over real sockets, and every way it can go wrong."""

import os
import signal
import subprocess
import time

import pytest

from mpvmm.guest import abi
from mpvmm.migration.address import parse
from mpvmm.migration.stream import Stream
from mpvmm.migration import address as addresses
from mpvmm.snapshot import records
from tests.conftest import ipc_objects
from tests.metrics.conftest import free_port
from tests.snapshot.test_restore import check_device_sums, in_kernel_share
from tests.vm_process import MPVMM, VmProcess, ctl, guest_ops


def migrate(source, url, *args, timeout=120):
    return ctl(source.api_path, "migrate", url, *args, timeout=timeout)


def check_carried_on(source_report, destination_report, op, cpus):
    """The destination's counts go on from the source's at the pause, and the guest found no lost state."""
    before, after = guest_ops(source_report, op), guest_ops(destination_report, op)
    assert len(after) == cpus
    assert all(a >= b > 0 for a, b in zip(after, before)), (before, after)
    assert sum(after) > sum(before)
    assert [v["outcome"] for v in destination_report["vcpus"]] == ["exited"] * cpus
    assert [v["outcome_value"] for v in destination_report["vcpus"]] == [abi.STATUS_OK] * cpus


def start_pair(tmp_path, url, *source_args, destination_seconds="1"):
    destination = VmProcess(tmp_path, "destination", "--incoming", url, "--seconds", destination_seconds)
    source = VmProcess(tmp_path, "source", *source_args)
    source.wait_running()
    return source, destination


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_atomics_on_four_vcpus_move_while_running(transport, tmp_path, no_leaks):
    url = f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path / 'in.sock'}"
    memory = "256M" if transport == "tcp" else "1G"
    source, destination = start_pair(tmp_path, url, "--cpus", "4", "--memory", memory, "--workload", "atomics")
    try:
        time.sleep(0.5)
        moved = migrate(source, url)
        assert moved.returncode == 0, moved.stderr
        assert source.finish() == 0, source.stderr
        assert f"mpvmm: migrated to {url} (downtime " in source.stderr
        assert destination.finish() == 0, destination.stderr
    finally:
        source.kill()
        destination.kill()
    sent, received = source.report(), destination.report()
    check_carried_on(sent, received, "atomic_increments", 4)
    assert received["atomic_total"] == sum(guest_ops(received, "atomic_increments"))
    assert sent["migration"]["role"] == "source" and received["migration"]["role"] == "destination"
    assert sent["migration"]["downtime_ms"] > 0 and received["migration"]["downtime_ms"] > 0
    if transport == "unix":  # the same pages: nothing copied
        assert sent["migration"]["memory"] == "passed" and sent["migration"]["pages_per_round"] == []
        assert not (tmp_path / "in.sock").exists()
    else:
        assert sent["migration"]["memory"] == "copied" and sent["migration"]["rounds"] >= 2
        assert sent["migration"]["pages_per_round"] == received["migration"]["pages_per_round"]
        assert sent["migration"]["pages_per_round"][0] > 10  # code, tables, stacks ...
    assert "migration to " in source.stdout and "migration from " in destination.stdout


@pytest.mark.parametrize("transport, workload", [("tcp", "writes"), ("tcp", "doorbell"), ("unix", "writes")])
def test_coalesced_writes_and_doorbells_over_the_ring_transport_move_with_their_sums(transport, workload, tmp_path,
                                                                                      no_leaks):
    """The source drains KVM's coalesced ring before it saves the devices; the destination registers
    the coalesced zones and doorbells on its own VM and makes its own rings, and uses them (with
    guest RAM copied over TCP, or passed as an fd)."""
    url = f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path / 'in.sock'}"
    destination = VmProcess(tmp_path, "destination", "--incoming", url, "--seconds", "0.5", "--transport", "ring")
    source = VmProcess(tmp_path, "source", "--cpus", "2", "--memory", "64M", "--workload", workload,
                       "--transport", "ring")
    try:
        source.wait_running()
        time.sleep(0.3)
        moved = migrate(source, url)
        assert moved.returncode == 0, moved.stderr
        assert source.finish() == 0, source.stderr
        assert destination.finish() == 0, destination.stderr
    finally:
        source.kill()
        destination.kill()
    sent, received = source.report(), destination.report()
    op = "mmio_writes" if workload == "writes" else "pio_doorbells"
    check_carried_on(sent, received, op, 2)
    check_device_sums(received)
    assert received["device_model"]["process"]["transport"] == "ring"
    assert in_kernel_share(received, workload) > 0
    assert sent["migration"]["memory"] == ("copied" if transport == "tcp" else "passed")


def test_a_dirtying_guest_converges_under_the_budget_at_a_low_rate(tmp_path, no_leaks):
    url = f"tcp:127.0.0.1:{free_port()}"
    source, destination = start_pair(tmp_path, url, "--cpus", "2", "--workload", "dirty", "--dirty-rate", "2")
    try:
        time.sleep(1.0)
        moved = migrate(source, url, "--downtime-ms", "300")
        assert moved.returncode == 0, moved.stderr
        assert source.finish() == 0 and destination.finish() == 0, destination.stderr
    finally:
        source.kill()
        destination.kill()
    sent, received = source.report(), destination.report()
    check_carried_on(sent, received, "dirty_pages", 2)
    pages = sent["migration"]["pages_per_round"]
    # The last round, sent paused, is the remainder the estimate let through: a few bursts' worth.
    assert len(pages) >= 2 and pages[-1] < pages[0]


def test_a_rate_it_cannot_meet_cancels_and_the_source_runs_on(tmp_path, no_leaks):
    url = f"tcp:127.0.0.1:{free_port()}"
    source, destination = start_pair(tmp_path, url, "--cpus", "2", "--workload", "dirty", "--dirty-rate", "32")
    try:
        time.sleep(0.5)
        before = ipc_objects()
        given_up = migrate(source, url, "--max-bandwidth", "4", "--timeout", "3")
        assert given_up.returncode == 1
        assert "did not converge within 3 s" in given_up.stderr and "the VM runs on here" in given_up.stderr
        assert destination.finish() == 1
        assert "the source cancelled the migration: it did not converge" in destination.stderr
        status = source.api("GET", "/v1/vm")[1]
        assert status["state"] == "running" and status["migration"]["phase"] == "cancelled"
        time.sleep(0.3)
        assert sum(source.api("GET", "/v1/vm")[1]["vcpus"][i]["exits"] for i in range(2)) > \
            sum(vcpu["exits"] for vcpu in status["vcpus"])
        assert ctl(source.api_path, "stop").returncode == 0
        assert source.finish() == 0, source.stderr
    finally:
        source.kill()
        destination.kill()
    assert ipc_objects() <= before
    report = source.report()
    assert [v["outcome_value"] for v in report["vcpus"]] == [abi.STATUS_OK] * 2


def slow_copy(tmp_path):
    """A source with 40 MiB of dirty data to send at 4 MiB/s, migrating; (source, destination, ctl process)."""
    url = f"tcp:127.0.0.1:{free_port()}"
    source, destination = start_pair(tmp_path, url, "--cpus", "2", "--workload", "dirty", "--dirty-rate", "40",
                                     destination_seconds="30")
    time.sleep(1.0)
    moving = subprocess.Popen([*MPVMM, "ctl", "--api-socket", source.api_path, "migrate", url,
                               "--max-bandwidth", "4", "--timeout", "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while source.api("GET", "/v1/vm")[1].get("migration", {}) is None or \
            source.api("GET", "/v1/vm")[1]["migration"]["phase"] != "copying":
        assert time.monotonic() < deadline and moving.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    return source, destination, moving


def test_destination_killed_mid_copy_leaves_the_source_running(tmp_path, no_leaks):
    source, destination, moving = slow_copy(tmp_path)
    try:
        os.kill(destination.pid, signal.SIGKILL)
        _out, err = moving.communicate(timeout=60)
        assert moving.returncode == 1 and "the VM runs on here" in err and "destination went away" in err, err
        assert source.api("GET", "/v1/vm")[1]["state"] == "running"
        assert ctl(source.api_path, "stop").returncode == 0
        assert source.finish() == 0, source.stderr
    finally:
        source.kill()
        destination.kill()
        moving.kill()
    assert [v["outcome_value"] for v in source.report()["vcpus"]] == [abi.STATUS_OK] * 2


def test_source_killed_mid_copy_ends_the_destination_with_exit_1(tmp_path, no_leaks):
    source, destination, moving = slow_copy(tmp_path)
    try:
        os.kill(source.pid, signal.SIGKILL)
        assert destination.finish() == 1
        lines = destination.stderr.strip().splitlines()
        assert lines[-1].startswith("mpvmm: error: the migration from 127.0.0.1:"), lines
        assert lines[-1].endswith(" failed before the VM started here: the source closed the connection"), lines
    finally:
        source.kill()
        destination.kill()
        moving.kill()
    os.unlink(source.api_path)  # a SIGKILLed VMM cannot remove its socket


def offer(url, machine, version=1):
    """A fake source's connection, past the hello: (stream, the destination's answer)."""
    sock = addresses.connect(parse(url), 10)
    stream = Stream(sock, "destination")
    stream.send(records.HELLO, {"version": version, "machine": machine, "memory": "pages"})
    return stream, stream.expect(records.READY, records.CANCEL)


MACHINE = {"cpus": 1, "memory": 64 << 20,
           "guest": {"kind": "builtin", "workload": "demo", "entry": 0x100000,
                     "params": {"abi_version": abi.ABI_VERSION, "cpus": 1}}}


def test_a_corrupt_stream_ends_the_destination_and_leaves_nothing(tmp_path, no_leaks):
    url = f"unix:{tmp_path / 'in.sock'}"
    destination = VmProcess(tmp_path, "destination", "--incoming", url, api=False)
    destination.wait_for(str(tmp_path / "in.sock"))
    stream, (kind, _ready) = offer(url, MACHINE)
    assert kind == records.READY
    prefix = records.PAGE_OFFSET.pack(0x200000)
    stream.sock.sendall(records.header(records.PAGES, len(prefix) + 4096, 12345) + prefix + b"\x01" * 4096)
    kind, message = stream.expect(records.CANCEL)
    assert "the pages at 0x200000 fail their checksum" in message["reason"]
    stream.close()
    assert destination.finish() == 1
    assert "corrupt migration stream from the source" in destination.stderr
    assert len(destination.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "in.sock").exists()


@pytest.mark.parametrize("change, reason", [
    ({"version": 2}, "migration stream version 2; this mpvmm speaks 1"),
    ({"machine": {**MACHINE, "guest": {"kind": "windows", "entry": 0}}}, "a guest of kind 'windows'"),
    ({"machine": {**MACHINE, "cpus": 0}}, "vCPU count 0"),
])
def test_an_offer_it_cannot_take_is_refused(change, reason, tmp_path, no_leaks):
    url = f"tcp:127.0.0.1:{free_port()}"
    destination = VmProcess(tmp_path, "destination", "--incoming", url, api=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = addresses.connect(parse(url), 10)
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    stream = Stream(sock, "destination")
    hello = {"version": 1, "machine": MACHINE, "memory": "pages", **change}
    stream.send(records.HELLO, hello)
    _kind, message = stream.expect(records.CANCEL)
    assert reason in message["reason"]
    stream.close()
    assert destination.finish() == 1
    assert reason in destination.stderr


def test_a_busy_incoming_address_is_exit_2(tmp_path, no_leaks):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        waiting = VmProcess(tmp_path, "destination", "--incoming", f"tcp:127.0.0.1:{port}", api=False)
        assert waiting.finish() == 2
    assert "cannot listen" in waiting.stderr


def test_a_destination_stopped_while_waiting_removes_its_socket(tmp_path, no_leaks):
    path = tmp_path / "in.sock"
    waiting = VmProcess(tmp_path, "destination", "--incoming", f"unix:{path}", api=False)
    waiting.wait_for(str(path))
    os.kill(waiting.pid, signal.SIGTERM)
    assert waiting.finish() == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in waiting.stderr
    assert not path.exists()


def test_a_stop_signal_mid_copy_cancels_then_ends_the_source(tmp_path, no_leaks):
    source, destination, moving = slow_copy(tmp_path)
    try:
        os.kill(source.pid, signal.SIGTERM)
        assert source.finish() == 128 + signal.SIGTERM, source.stderr
        assert "stopped by SIGTERM" in source.stderr
        assert destination.finish() == 1
        assert "the source cancelled the migration: the run is ending: stopped by SIGTERM" in destination.stderr
        _out, err = moving.communicate(timeout=60)
        assert moving.returncode == 1 and "cancelled, the VM runs on here" in err, err
    finally:
        source.kill()
        destination.kill()
        moving.kill()
    assert [v["outcome_value"] for v in source.report()["vcpus"]] == [abi.STATUS_OK] * 2
