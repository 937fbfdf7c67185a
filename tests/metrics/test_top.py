"""``mpvmm top``: the rate arithmetic on made-up scrapes, and --once against a real VM."""

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console

from mpvmm.metrics.top import parse, rate_table
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
        "vcpu", "exits", "hlt", "io", "mmio", "native", "posted", "sync", "sync p99 us", "kvm exits", "cpu %"]
    rows = table_rows(render(table))
    assert rows["0"] == ["100", "0", "100", "0", "100", "0", "0", "-", "200", "75"]
    # vCPU 1: 100 mmio exits in 2 s, all sync, all within 1 ms (the p99 bucket's bound).
    assert rows["1"] == ["52", "2", "0", "50", "0", "0", "50", "1000", "-", "0"]
    assert rows["all"] == ["152", "2", "100", "50", "100", "0", "50", "200", "75"]


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
