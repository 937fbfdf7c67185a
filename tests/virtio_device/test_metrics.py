"""The virtio devices' counters as /metrics, ``mpvmm top``, the dashboard and the report show them.

A real VM drives a disk; the scraped counters are checked against the
guest's own counts, and a real Prometheus answers every query of the
dashboard's virtio row. A console on a real pseudo-terminal gets what is
typed.
"""

import io
import json
import os
import subprocess
import sys
import termios
import time

from rich.console import Console

from mpvmm.metrics.top import parse, top_view, virtio_table
from mpvmm.supervisor.run import RunConfig, Supervisor
from mpvmm.supervisor.summary import report_dict, virtio_line
from tests.metrics.conftest import PrometheusServer, fetch, value_by
from tests.metrics.test_prometheus import SCRAPES_BEFORE_QUERYING, dashboard_targets, grafana_substitute
from tests.virtio_device.test_run import make_disk


def test_metrics_top_dashboard_and_report_show_each_device(tmp_path, no_leaks):
    disk = make_disk(tmp_path / "disk.img")
    targets = dashboard_targets(virtio=True)
    seen = {}

    def observe(vm):
        url = f"http://127.0.0.1:{vm.metrics.port}/metrics"
        server = PrometheusServer(tmp_path, f"127.0.0.1:{vm.metrics.port}")
        try:
            first = parse(fetch(url), time.monotonic())
            server.wait_ready()
            server.wait_for_scrapes(SCRAPES_BEFORE_QUERYING)
            seen["answers"] = [server.query(grafana_substitute(target["expr"])) for _, target in targets]
            seen["scrape"] = parse(fetch(url), time.monotonic())
            seen["guest_reads"] = vm.guest.counts(0).ops["blk_reads"]  # after the scrape: at least its count
            seen["table"] = virtio_table(first, seen["scrape"])
        finally:
            server.close()

    config = RunConfig(workload="virtio-blk-rw", disks=(disk,), seconds=0.5, queue_depth=4, metrics_port=0,
                       console=str(tmp_path / "console"))
    result = Supervisor(config, on_started=observe).run()
    assert result.exit_code == 0, result.status
    ops = result.vcpus[0].guest.ops

    samples = seen["scrape"].samples
    requests = value_by(samples, "mpvmm_virtio_requests_total", "op", device="disk0")
    assert 0 < requests["read"] <= seen["guest_reads"] <= ops["blk_reads"]
    assert requests["write"] <= ops["blk_writes"] and requests["flush"] <= ops["blk_flushes"]
    paths = value_by(samples, "mpvmm_virtio_notifications_total", "path", device="disk0")
    assert paths["userspace"] == 0 and 0 < paths["in_kernel"] <= ops["virtio_kicks"]
    data = value_by(samples, "mpvmm_virtio_queue_bytes_total", "direction", device="disk0", queue="0")
    assert data["written"] >= requests["read"] * 4096  # each read's 4 KiB, plus status bytes
    info = value_by(samples, "mpvmm_virtio_device_info", "kind", device="disk0")
    assert info == {"block": 1.0}

    # Every query of the dashboard's virtio row has data; the reads' rate is not zero.
    for (panel, target), answer in zip(targets, seen["answers"]):
        assert answer, f"no data for panel {panel['title']!r}: {target['expr']}"
    by_title = {panel["title"]: answer for (panel, _), answer in zip(targets, seen["answers"])}
    reads = [float(s["value"][1]) for s in by_title["virtio requests"] if s["metric"]["op"] == "read"]
    assert reads and reads[0] > 0

    # mpvmm top's virtio table: a row for the disk, reads per second not zero.
    text = _render(seen["table"])
    (line,) = [line for line in text.splitlines() if line.strip().startswith("disk0")]
    assert float(line.split()[1]) > 0, text

    # The report and the summary line carry the device's last counters.
    report = report_dict(result)["virtio"]["disk0"]
    assert report["device"]["reads"] == ops["blk_reads"] and report["device"]["writes"] == ops["blk_writes"]
    json.dumps(report)  # plain data
    assert f"({ops['blk_reads']} reads, {ops['blk_writes']} writes" in virtio_line("disk0", report)
    assert "0 userspace" in virtio_line("disk0", report)


def test_top_shows_no_virtio_table_without_devices():
    text = "# TYPE mpvmm_vm_info gauge\nmpvmm_vm_info{cpus=\"1\"} 1.0\n"
    before, after = parse(text, 1.0), parse(text, 2.0)
    assert virtio_table(before, after) is None
    assert len(top_view(before, after).renderables) == 2  # the vCPUs' and the device model's


def test_typed_input_reaches_the_virtio_console(tmp_path, spawn):
    """On a real terminal: what is typed goes to the console device's process, not the UART."""
    leader, follower = os.openpty()
    try:
        process = spawn([sys.executable, "-m", "mpvmm", "start", "--workload", "pio-null", "--seconds", "3",
                         "--console-device", "virtio", "--no-metrics", "--report", str(tmp_path / "report.json")],
                        stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not _raw(follower):  # raw mode on: the run is up
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        os.write(leader, b"typed")
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    finally:
        os.close(leader)
        os.close(follower)
    report = json.loads((tmp_path / "report.json").read_text())
    console = report["virtio"]["console"]
    assert console["input_bytes"] == 5 and console["device"]["in_bytes"] == 5
    assert "terminal_input" not in report["device_model"]  # the device model was given no terminal


def _raw(fd: int) -> bool:
    return not termios.tcgetattr(fd)[3] & termios.ICANON


def _render(table) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()
