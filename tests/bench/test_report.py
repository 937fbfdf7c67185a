"""How run samples become records: medians, ratios to raw, scaling efficiency."""

import pytest

from mpvmm.bench.measure import RunSample
from mpvmm.bench.report import build_records
from mpvmm.guest import abi

HOST = {"cpu_model": "test"}


def sample(runner, cpus, per_vcpu_rate, workload="pio-null", seconds=2.0, sync_buckets=(), sync_sum=0.0,
           iterations=0, transport="ring", **ops):
    counts = dict.fromkeys(abi.OPS, 0) | ops
    counts["compute_iterations"] = iterations
    return RunSample(workload=workload, runner=runner, transport=None if runner == "raw" else transport,
                     cpus=cpus, seconds=seconds, exits=[int(per_vcpu_rate * seconds)] * cpus,
                     sync_buckets=list(sync_buckets), sync_sum_seconds=sync_sum, guest_ops=counts, pinned_cpus=None)


def by_key(records):
    return {(r["workload"], r["runner"], r["cpus"]): r for r in records}


def test_each_transport_is_a_record_of_its_own_against_the_one_raw_run():
    samples = [sample("raw", 1, 100), sample("native", 1, 50, transport="ring"),
               sample("native", 1, 25, transport="mq"), sample("native", 2, 40, transport="ring")]
    records = {(r["runner"], r["transport"], r["cpus"]): r for r in build_records(samples, HOST)}
    assert set(records) == {("raw", None, 1), ("native", "ring", 1), ("native", "mq", 1), ("native", "ring", 2)}
    assert records["native", "ring", 1]["ratio_to_raw"] == pytest.approx(0.5)
    assert records["native", "mq", 1]["ratio_to_raw"] == pytest.approx(0.25)
    assert records["native", "ring", 2]["scaling_efficiency"] == pytest.approx(80 / (2 * 50))


def test_device_accesses_count_every_path_but_the_native_ports():
    # 1000 coalesced writes, 250 reads, 100 doorbells and 50 uart bytes in 2 s; the null port is no device.
    record = build_records([sample("native", 1, 10, "pio-device", pio_device_writes=1000, pio_device_reads=250,
                                   pio_doorbells=100, uart_bytes=50, pio_null_writes=999)], HOST)[0]
    assert record["device_accesses_per_second"] == pytest.approx((1000 + 250 + 100 + 50) / 2)
    # The device workloads are judged by it: KVM took most of these without an exit.
    assert record["throughput_unit"] == "device_accesses"
    assert record["throughput_per_second"] == record["device_accesses_per_second"] > record["exits_per_second"]


def test_raw_and_a_coalescing_runner_compare_by_the_guests_accesses():
    raw = sample("raw", 1, 1000, "mmio", mmio_writes=1600, mmio_reads=400)  # every access an exit
    native = sample("native", 1, 300, "mmio", mmio_writes=3200, mmio_reads=800)  # most writes in KVM
    record = by_key(build_records([raw, native], HOST))["mmio", "native", 1]
    assert record["ratio_to_raw"] == pytest.approx(2.0)


def test_median_of_repeats_ratio_and_efficiency():
    samples = [
        sample("raw", 1, 100), sample("raw", 1, 300), sample("raw", 1, 200),
        sample("native", 1, 90), sample("native", 1, 95), sample("native", 1, 1000),
        sample("raw", 2, 200), sample("native", 2, 80),
    ]
    records = by_key(build_records(samples, HOST))
    assert len(records) == 4
    raw1, native1, native2 = records["pio-null", "raw", 1], records["pio-null", "native", 1], records["pio-null", "native", 2]
    assert raw1["exits_per_second"] == 200 and raw1["repeats"] == 3
    assert raw1["exits_per_second_runs"] == [100, 300, 200]
    assert native1["exits_per_second"] == 95  # the outlier does not move a median
    assert native1["ratio_to_raw"] == pytest.approx(95 / 200)
    assert raw1["ratio_to_raw"] == 1.0 and raw1["scaling_efficiency"] == 1.0
    assert native2["exits_per_second"] == 160 and native2["exits_per_second_per_vcpu"] == [80, 80]
    assert native2["exits_total"] == 320
    assert native2["scaling_efficiency"] == pytest.approx(160 / (2 * 95))
    assert native2["ratio_to_raw"] == pytest.approx(160 / 400)
    assert native2["sync_latency_p50_seconds"] is None and native2["host"] is HOST


def test_missing_reference_leaves_ratios_empty():
    records = build_records([sample("native", 2, 10), sample("python", 4, 10)], HOST)
    assert all(r["ratio_to_raw"] is None and r["scaling_efficiency"] is None for r in records)


def test_sync_latency_quantiles_merge_every_repeat():
    # Bucket k holds round trips of at most 2**k us: 90 at <= 16 us, 10 at <= 1024 us.
    fast = [0] * 21
    fast[4] = 90
    slow = [0] * 21
    slow[10] = 10
    record = build_records([sample("native", 1, 10, "pio-device", sync_buckets=fast, sync_sum=0.001),
                            sample("native", 1, 10, "pio-device", sync_buckets=slow, sync_sum=0.009)], HOST)[0]
    assert record["sync_latency_p50_seconds"] == pytest.approx(16e-6)
    assert record["sync_latency_p99_seconds"] == pytest.approx(1024e-6)
    assert record["sync_latency_mean_seconds"] == pytest.approx(0.010 / 100)


def test_compute_is_measured_by_guest_iterations():
    records = by_key(build_records([sample("raw", 1, 0, "compute", iterations=4_000_000),
                                    sample("native", 1, 0, "compute", iterations=2_000_000)], HOST))
    native = records["compute", "native", 1]
    assert native["throughput_unit"] == "compute_iterations"
    assert native["throughput_per_second"] == 1_000_000 and native["exits_per_second"] == 0
    assert native["ratio_to_raw"] == pytest.approx(0.5)
