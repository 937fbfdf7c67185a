"""The /metrics endpoint of real VMs: its numbers against the guest's and the report's,
its port handling, and that it leaves nothing behind."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from mpvmm.cli import build_parser
from mpvmm.errors import UsageError
from mpvmm.metrics import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_PORT
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.supervisor.summary import report_dict
from mpvmm.vcpu_worker import stats_page
from tests.metrics.conftest import (debian_prometheus_tool, fetch, scrape_values, series,
                                   value_by)

MPVMM = [sys.executable, "-m", "mpvmm"]


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def metrics_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "metrics"]


def settled_scrape(url: str, timeout: float = 3.0) -> dict:
    """A scrape once the device model's counts stopped moving.

    With every vCPU stopped nothing new is sent, but posted writes may still
    sit in the queues; the device model drains them in microseconds.
    """
    deadline = time.monotonic() + timeout
    previous = scrape_values(url)
    while True:
        time.sleep(0.05)
        current = scrape_values(url)
        if series(current, "mpvmm_device_requests_total") == series(previous, "mpvmm_device_requests_total"):
            return current
        assert time.monotonic() < deadline, "device model counts kept changing after the vCPUs stopped"
        previous = current


@pytest.mark.parametrize("runner", ["native", "process"])
def test_exported_counts_equal_guest_and_report(runner, tmp_path, no_leaks):
    seen = {}

    def while_running(vm):
        time.sleep(0.4)
        seen["running"] = scrape_values(vm.metrics.url)

    def after_vcpus_stopped(vm):
        seen["stopped"] = settled_scrape(vm.metrics.url)

    config = RunConfig(cpus=2, memory=64 << 20, workload="pio-device", seconds=1.0, runner=runner,
                       console=str(tmp_path / "console"), metrics_port=0)
    result = Supervisor(config, on_started=while_running, on_stopped=after_vcpus_stopped).run()
    assert result.exit_code == 0, result.status
    report = report_dict(result)
    samples = seen["stopped"]

    info = series(samples, "mpvmm_vm_info")
    assert list(info.values()) == [1.0]
    assert dict(next(iter(info))) | {"version": "?"} == {
        "version": "?", "cpus": "2", "memory_bytes": str(64 << 20), "runner": runner, "transport": "ring",
        "workload": "pio-device"}

    for vcpu in report["vcpus"]:
        index = str(vcpu["index"])
        exits = value_by(samples, "mpvmm_vcpu_exits_total", "reason", vcpu=index)
        assert {reason: count for reason, count in exits.items() if count} == vcpu["exits"]
        assert value_by(samples, "mpvmm_vcpu_exit_route_total", "route", vcpu=index) == vcpu["paths"]
        assert value_by(samples, "mpvmm_guest_ops_total", "op", vcpu=index) == vcpu["guest"]["ops"]
        assert vcpu["paths"]["posted"] > 0 and vcpu["paths"]["sync"] > 0
        for name in ("server_wakeups", "reply_sleeps"):
            assert list(series(samples, f"mpvmm_vcpu_{name}_total", vcpu=index).values()) == [vcpu[name]]

        # The histogram is cumulative over the report's per-bucket counts.
        buckets = value_by(samples, "mpvmm_vcpu_sync_exit_latency_seconds_bucket", "le", vcpu=index)
        bounds = sorted(buckets, key=float)
        cumulative = [sum(vcpu["sync_latency_buckets"][: i + 1]) for i in range(stats_page.LATENCY_BUCKETS)]
        assert [buckets[le] for le in bounds] == cumulative
        assert bounds[-1] == "+Inf" and len(bounds) == stats_page.LATENCY_BUCKETS
        count = series(samples, "mpvmm_vcpu_sync_exit_latency_seconds_count", vcpu=index)
        total = series(samples, "mpvmm_vcpu_sync_exit_latency_seconds_sum", vcpu=index)
        assert list(count.values()) == [vcpu["paths"]["sync"]]
        assert list(total.values()) == [pytest.approx(vcpu["sync_latency_sum_seconds"])]

        # While it ran, its thread used CPU time (gone with the thread afterwards).
        cpu = value_by(seen["running"], "mpvmm_vcpu_cpu_seconds_total", "mode", vcpu=index)
        assert set(cpu) == {"user", "system"} and sum(cpu.values()) > 0

        if runner != "process":  # worker processes have VMs of their own, not read by the exporter
            kvm_exits = series(samples, "mpvmm_kvm_vcpu_exits_total", vcpu=index)
            assert list(kvm_exits.values())[0] >= sum(vcpu["exits"].values())

    device = report["device_model"]
    for device_name, ops in device["requests"].items():
        assert value_by(samples, "mpvmm_device_requests_total", "op", device=device_name) == ops
    assert sum(value_by(samples, "mpvmm_device_unmapped_requests_total", "op", space="pio").values()) == 0
    assert set(value_by(samples, "mpvmm_device_rejected_messages_total", "reason")) == set(device["rejected"])
    # What KVM took in the kernel, as the device model counted it.
    assert value_by(samples, "mpvmm_device_coalesced_writes_total", "device") == device["coalesced"]
    assert value_by(samples, "mpvmm_device_doorbells_total", "device") == device["doorbells"]
    ring, process = series(samples, "mpvmm_coalesced_ring_entries_total"), device["process"]
    if runner == "process":  # its VMs' rings are not drained (vcpu_host.py): their writes exit
        assert not ring and process["coalesced_ring"] is None
    else:
        assert list(ring.values()) == [process["coalesced_ring"]["entries"]] and process["coalesced_ring"]["entries"] > 0
        assert list(series(samples, "mpvmm_coalesced_ring_capacity_entries").values()) == [169]
    assert list(series(samples, "mpvmm_transport_server_wakeups_total").values()) == [process["wakeups"]]
    assert series(samples, "mpvmm_transport_poll_window_seconds")
    for process in ("supervisor", "device_model"):
        assert list(series(samples, f"mpvmm_{process}_process_resident_memory_bytes").values())[0] > 0

    if runner != "process":
        assert series(samples, "mpvmm_kvm_vm_pages_4k")
        # KVM's halt-wait histogram, summed over the vCPUs: its _sum is their halt_wait_ns.
        buckets = value_by(samples, "mpvmm_kvm_vcpus_halt_wait_seconds_bucket", "le")
        counts = [buckets[le] for le in sorted(buckets, key=float)]
        assert len(counts) == 32 and counts == sorted(counts)
        assert list(series(samples, "mpvmm_kvm_vcpus_halt_wait_seconds_count").values()) == [counts[-1]]
        waited = sum(series(samples, "mpvmm_kvm_vcpu_halt_wait_seconds_total").values())
        assert list(series(samples, "mpvmm_kvm_vcpus_halt_wait_seconds_sum").values()) == [pytest.approx(waited)]


def test_exposition_passes_promtool_lint(tmp_path, no_leaks):
    """Prometheus's own linter: counter suffixes, base units, help text, naming."""
    text = {}

    def grab(vm):
        time.sleep(0.2)
        text["metrics"] = fetch(vm.metrics.url)

    config = RunConfig(cpus=1, memory=64 << 20, workload="demo", seconds=0.3,
                       console=str(tmp_path / "console"), metrics_port=0)
    assert Supervisor(config, on_started=grab).run().exit_code == 0
    assert "mpvmm_kvm_vcpu_halt_wait_seconds_total" in text["metrics"]  # ns converted to seconds
    lint = subprocess.run([debian_prometheus_tool("promtool"), "check", "metrics"], input=text["metrics"],
                          capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


def test_server_is_gone_after_the_run(tmp_path, no_leaks):
    ports = []
    config = RunConfig(cpus=1, memory=64 << 20, workload="pio-null", seconds=0.2,
                       console=str(tmp_path / "console"), metrics_port=0)
    Supervisor(config, on_started=lambda s: ports.append(s.metrics.port)).run()
    assert ports and ports[0] > 0
    assert metrics_threads() == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2).close()


def test_busy_port_is_a_usage_error_before_anything_is_created(tmp_path, no_leaks):
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        config = RunConfig(cpus=2, memory=64 << 20, seconds=0.2, metrics_port=port)
        started = []
        with pytest.raises(UsageError, match=f"--metrics-port {port}"):
            Supervisor(config, on_started=started.append).run()
    assert started == []  # no VM was built; no_leaks finds no guest RAM, queue or device model
    assert metrics_threads() == []


def test_busy_port_on_the_command_line_is_one_line_and_exit_2(no_leaks):
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        process = subprocess.run([*MPVMM, "start", "--metrics-port", str(port), "--seconds", "0.2"],
                                 capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and "--metrics-port" in lines[0] and str(port) in lines[0], process.stderr


@pytest.mark.parametrize("args, message", [
    (["--metrics-port", "70000"], "--metrics-port must be between 0 and 65535, not 70000"),
    (["--metrics-addr", "192.0.2.1"], "--metrics-addr 192.0.2.1: not an address of this host"),
])
def test_bad_metrics_options_are_one_line_and_exit_2(args, message, no_leaks):
    process = subprocess.run([*MPVMM, "start", *args, "--seconds", "0.2"], capture_output=True, text=True,
                             timeout=30)
    assert process.returncode == 2
    assert process.stderr.splitlines() == [f"mpvmm: error: {message}"]


def test_no_metrics_binds_nothing(tmp_path, no_leaks):
    with listening_socket() as busy:
        port = busy.getsockname()[1]
        process = subprocess.run([*MPVMM, "start", "--no-metrics", "--metrics-port", str(port),
                                  "--seconds", "0.3", "--workload", "pio-null",
                                  "--console", str(tmp_path / "console")],
                                 capture_output=True, text=True, timeout=30)
    assert process.returncode == 0, process.stderr


def test_command_line_defaults():
    args = build_parser().parse_args(["start"])
    assert (args.metrics_addr, args.metrics_port, args.no_metrics) == (DEFAULT_METRICS_ADDR, 9477, False)
    assert DEFAULT_METRICS_PORT == 9477
