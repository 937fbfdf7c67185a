"""``mpvmm top``: the rate arithmetic on made-up scrapes, and --once against a real VM."""

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console

from mpvmm.metrics.top import device_table, parse, rate_table
from mpvmm.supervisor.run import RunConfig, Supervisor
from tests.metrics.conftest import free_port

MPVMM = [sys.executable, "-m", "mpvmm"]
ROW = re.compile(r"^\s*(\d+|all)\s+(\S.*)$")

INFO = 'mpvmm_vm_info{cpus="2",runner="native",workload="demo",version="0"} 1\n'
BEFORE = INFO + """
mpvmm_vcpu_exits_total{vcpu="0",reason="io"} 100
mpvmm_vcpu_exits_total{vcpu="0",reason="mmio"} 0
mpvmm_vcpu_exits_total{vcpu="1",reason="io"} 1000
mpvmm_vcpu_exits_total{vcpu="1",reason="mmio"} 10
mpvmm_vcpu_exit_route_total{vcpu="0",route="native"} 100
mpvmm_vcpu_exit_route_total{vcpu="1",route="sync"} 10
mpvmm_kvm_vcpu_exits_total{vcpu="0"} 200
mpvmm_vcpu_cpu_seconds_total{vcpu="0",mode="user"} 1
mpvmm_vcpu_cpu_seconds_total{vcpu="0",mode="system"} 1
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="1e-05"} 5
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="0.001"} 10
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="+Inf"} 10
"""
# Two seconds later.
AFTER = INFO + """
mpvmm_vcpu_exits_total{vcpu="0",reason="io"} 300
mpvmm_vcpu_exits_total{vcpu="0",reason="mmio"} 0
mpvmm_vcpu_exits_total{vcpu="1",reason="io"} 1000
mpvmm_vcpu_exits_total{vcpu="1",reason="mmio"} 110
mpvmm_vcpu_exits_total{vcpu="1",reason="hlt"} 4
mpvmm_vcpu_exit_route_total{vcpu="0",route="native"} 300
mpvmm_vcpu_exit_route_total{vcpu="1",route="sync"} 110
mpvmm_kvm_vcpu_exits_total{vcpu="0"} 600
mpvmm_vcpu_cpu_seconds_total{vcpu="0",mode="user"} 1.5
mpvmm_vcpu_cpu_seconds_total{vcpu="0",mode="system"} 2
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="1e-05"} 5
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="0.001"} 110
mpvmm_vcpu_sync_exit_latency_seconds_bucket{vcpu="1",le="+Inf"} 110
"""


def table_rows(text: str) -> dict[str, list[str]]:
    """{first cell: the other cells} of each body row of a rendered table (cells hold no spaces)."""
    rows = {}
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            rows[match.group(1)] = match.group(2).split()
    return rows


def render(table) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_rates_are_differences_over_time():
    table = rate_table(parse(BEFORE, 10.0), parse(AFTER, 12.0))
    assert [column.header for column in table.columns] == [
        "vcpu", "exits", "hlt", "io", "mmio", "native", "posted", "sync", "fallback", "sync p99 us", "kvm exits",
        "cpu %"]
    rows = table_rows(render(table))
    assert rows["0"] == ["100", "0", "100", "0", "100", "0", "0", "0", "-", "200", "75"]
    # vCPU 1: 100 mmio exits in 2 s, all sync, all within 1 ms (the p99 bucket's bound).
    assert rows["1"] == ["52", "2", "0", "50", "0", "0", "50", "0", "1000", "-", "0"]
    assert rows["all"] == ["152", "2", "100", "50", "100", "0", "50", "0", "200", "75"]


DEVICES_BEFORE = INFO + """
mpvmm_device_requests_total{device="testdev-pio",op="read"} 10
mpvmm_device_requests_total{device="testdev-pio",op="write"} 0
mpvmm_device_coalesced_writes_total{device="testdev-pio"} 100
mpvmm_device_doorbells_total{device="testdev-mmio"} 0
mpvmm_vcpu_exit_route_total{vcpu="0",route="fallback"} 1
mpvmm_coalesced_ring_drains_total 50
mpvmm_coalesced_ring_occupancy_entries 3
mpvmm_coalesced_ring_peak_entries 40
mpvmm_coalesced_ring_capacity_entries 169
mpvmm_transport_server_wakeups_total 20
mpvmm_transport_polled_hits_total 0
mpvmm_transport_poll_window_seconds 0.00004
"""
DEVICES_AFTER = DEVICES_BEFORE.replace(' 10\n', ' 30\n').replace(' 100\n', ' 900\n').replace(
    'device="testdev-mmio"} 0', 'device="testdev-mmio"} 8').replace('route="fallback"} 1', 'route="fallback"} 5').replace(
    "drains_total 50", "drains_total 250").replace("wakeups_total 20", "wakeups_total 24").replace(
    "hits_total 0", "hits_total 16")


def test_device_table_shows_each_path_and_the_ring_and_transport():
    table = device_table(parse(DEVICES_BEFORE, 10.0), parse(DEVICES_AFTER, 12.0))
    assert [column.header for column in table.columns] == ["device", "requests", "coalesced", "doorbells"]
    text = render(table)
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip().startswith("testdev")}
    assert lines == {"testdev-mmio": ["0", "0", "4"], "testdev-pio": ["10", "400", "0"]}
    flat = " ".join(text.split())
    assert "100 drains/s, 2 full-ring fallbacks/s, 3 waiting (peak 40 of 169)" in flat
    assert "2 wake-ups/s, 8 polled hits/s" in flat and "poll window 40 us" in flat


def test_once_prints_a_row_per_vcpu_of_a_running_vm(tmp_path, no_leaks):
    output = {}

    def run_top(vm):
        output["top"] = subprocess.run([*MPVMM, "top", "--once", "--url", vm.metrics.url],
                                       capture_output=True, text=True, timeout=30)

    config = RunConfig(cpus=4, memory=64 << 20, workload="pio-null", seconds=0.2,
                       console=str(tmp_path / "console"), metrics_port=0)
    result = Supervisor(config, on_started=run_top).run()
    assert result.exit_code == 0
    top = output["top"]
    assert top.returncode == 0, top.stderr
    rows = table_rows(top.stdout)
    assert set(rows) == {"0", "1", "2", "3", "all"}, top.stdout
    window = float(re.search(r"per second over ([\d.]+) s", top.stdout).group(1))
    for vcpu in result.vcpus:
        # Counts, not a rate: pio-null exits all the time, so every vCPU made
        # some exits in top's window, and never more than in the whole run.
        exits_in_window = int(rows[str(vcpu.index)][0]) * window
        assert 0 < exits_in_window <= 1.1 * vcpu.exits["io"], top.stdout
    assert "testdev-pio" in top.stdout and "coalesced ring:" in " ".join(top.stdout.split())


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "0", "-1", "1e300", "often"])
@pytest.mark.parametrize("once", [[], ["--once"]])
def test_bad_interval_is_one_line_and_exit_2(interval, once):
    """Checked before any scrape: the URL is never contacted."""
    process = subprocess.run([*MPVMM, "top", *once, f"--interval={interval}", "--url", "http://127.0.0.1:1/metrics"],
                             capture_output=True, text=True, timeout=30)
    assert process.returncode == 2
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and "argument --interval: " in lines[0], process.stderr


def test_unreachable_url_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    process = subprocess.run([*MPVMM, "top", "--once", "--url", url], capture_output=True, text=True, timeout=30)
    assert process.returncode == 1
    assert process.stdout == ""
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mpvmm: error: cannot reach {url}"), process.stderr
