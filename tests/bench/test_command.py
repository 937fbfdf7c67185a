"""``mpvmm bench`` end to end: bad input, and a short real run's JSON, table and plot."""

import json
import struct
import subprocess
import sys
import time

import pytest

from mpvmm.cli import main
from tests.conftest import device_model_processes, ipc_objects

RECORD_KEYS = {
    "workload", "runner", "transport", "cpus", "seconds", "exits_total", "exits_per_second",
    "exits_per_second_per_vcpu", "ratio_to_raw", "scaling_efficiency", "device_accesses_per_second",
    "sync_latency_p50_seconds", "sync_latency_p99_seconds", "host",
}
HOST_KEYS = {"cpu_model", "cores", "kernel", "python_version"}
WORKLOADS, RUNNERS, CPUS = ("pio-null", "pio-device"), ("raw", "native", "python"), (1, 2)
TRANSPORTS = ("ring", "mq")
WINDOW_SECONDS = 0.5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [
    ["--workload", "pio-null,nosuch"],
    ["--runner", "raw,qemu"],
    ["--transport", "ring,pigeon"],
    ["--cpus", "0,1"],
    ["--cpus", "two"],
    ["--seconds", "-1"],
    ["--seconds", "0"],
    ["--seconds", "nan"],
    ["--seconds", "inf"],
    ["--seconds", "-inf"],
    ["--seconds", "1e300"],
    ["--repeat", "0"],
    ["--json", "/nonexistent-dir/bench.json"],
])
def test_bad_input_is_one_line_and_exit_code_2(args, capsys):
    try:
        code = main(["bench", *args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1, captured.err


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, kvm_available):
    folder = tmp_path_factory.mktemp("bench")
    before = ipc_objects(), device_model_processes()
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "mpvmm", "bench", "--cpus", ",".join(map(str, CPUS)),
         "--workload", ",".join(WORKLOADS), "--runner", ",".join(RUNNERS), "--transport", ",".join(TRANSPORTS),
         "--seconds", str(WINDOW_SECONDS), "--repeat", "1",
         "--json", str(folder / "bench.json"), "--plot", str(folder / "bench.png")],
        capture_output=True, text=True, timeout=120,
    )
    wall_seconds = time.monotonic() - started
    assert completed.returncode == 0, completed.stderr
    assert (ipc_objects(), device_model_processes()) == before, "the bench left VM resources behind"
    return completed, json.loads((folder / "bench.json").read_text()), (folder / "bench.png").read_bytes(), wall_seconds


def test_json_has_one_record_per_combination(bench_run):
    _, records, _, wall_seconds = bench_run
    assert sorted((r["workload"], r["runner"], r["transport"] or "-", r["cpus"]) for r in records) == sorted(
        (w, r, t, c) for w in WORKLOADS for r in RUNNERS for c in CPUS
        for t in (("-",) if r == "raw" else TRANSPORTS))
    for record in records:
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert HOST_KEYS <= set(record["host"])
        assert record["seconds"] >= WINDOW_SECONDS
        per_vcpu = record["exits_per_second_per_vcpu"]
        assert len(per_vcpu) == record["cpus"] and all(rate > 0 for rate in per_vcpu)
        assert record["exits_per_second"] == pytest.approx(sum(per_vcpu), rel=1e-6)
        assert record["exits_total"] == pytest.approx(record["exits_per_second"] * record["seconds"], abs=1)
        assert record["ratio_to_raw"] > 0 and record["scaling_efficiency"] > 0
        assert (record["transport"] is None) == (record["runner"] == "raw")
        figure = "device_accesses" if record["workload"] == "pio-device" else "exits"
        assert record["throughput_unit"] == figure
        assert record["throughput_per_second"] == record[f"{figure}_per_second"]
        # Every pio-device access is one the guest made to a device: four writes and a read a round.
        if record["workload"] == "pio-device":
            assert record["device_accesses_per_second"] > 0
        else:
            assert record["device_accesses_per_second"] == 0
    # The windows are disjoint parts of the bench's runs (no timing bound:
    # a loaded host stretches them, never past the whole command).
    assert sum(record["seconds"] for record in records) < wall_seconds


def test_json_reference_points_and_sync_latency(bench_run):
    _, records, _, _ = bench_run
    for record in records:
        if record["runner"] == "raw":
            assert record["ratio_to_raw"] == 1.0
        if record["cpus"] == 1:
            assert record["scaling_efficiency"] == 1.0
        # Only the device workload has sync exits, and raw answers reads in place.
        if record["workload"] == "pio-device" and record["runner"] != "raw":
            assert 0 < record["sync_latency_p50_seconds"] <= record["sync_latency_p99_seconds"]
        else:
            assert record["sync_latency_p50_seconds"] is None and record["sync_latency_p99_seconds"] is None


def test_table_and_progress_without_guest_console(bench_run):
    completed, _, _, _ = bench_run
    assert "pio-null: exits per second" in completed.stdout
    assert "pio-device: accesses per second" in completed.stdout
    assert "ratio to raw" in completed.stdout and "scaling eff." in completed.stdout
    assert "device acc/s" in completed.stdout
    assert "pio-device python/mq 2 vCPUs (repeat 1):" in completed.stderr
    assert "online" not in completed.stdout + completed.stderr  # the guest's console went to /dev/null


def test_plot_is_a_png(bench_run):
    _, _, png, _ = bench_run
    assert png.startswith(PNG_SIGNATURE)
    # IHDR, the first chunk, holds the size: a real figure, not an empty canvas.
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 400 and height >= 300
