"""Naming KVM's binary statistics: made-up descriptors, then every one a real vCPU has."""

import re

import pytest

from mpvmm.kvm.binary_stats import StatsDescriptor, StatsReader
from mpvmm.kvm.system import Kvm
from mpvmm.metrics.collector import histogram_family
from mpvmm.metrics.kvm_names import bucket_upper_bounds, kvm_histograms, kvm_metric, kvm_metrics

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def descriptor(name, type="cumulative", unit="none", base=10, exponent=0, size=1, bucket_size=0):
    return StatsDescriptor(name=name, type=type, unit=unit, base=base, exponent=exponent, size=size,
                           offset=0, bucket_size=bucket_size)


def test_nanosecond_counter_becomes_seconds_total():
    metric = kvm_metric("mpvmm_kvm_vcpu", descriptor("halt_wait_ns", unit="seconds", exponent=-9))
    assert (metric.name, metric.kind, metric.scale) == ("mpvmm_kvm_vcpu_halt_wait_seconds", "counter", 1e-9)


def test_plain_counter_instant_peak_and_boolean():
    assert kvm_metric("p", descriptor("exits")).name == "p_exits"
    assert kvm_metric("p", descriptor("exits")).kind == "counter"
    assert kvm_metric("p", descriptor("pages_4k", type="instant")).kind == "gauge"
    assert kvm_metric("p", descriptor("max_mmu_rmap_size", type="peak")).kind == "gauge"
    blocking = kvm_metric("p", descriptor("blocking", type="instant", unit="boolean"))
    assert (blocking.name, blocking.kind, blocking.scale) == ("p_blocking", "gauge", 1.0)


def test_scaled_bytes_and_odd_names():
    pages = kvm_metric("p", descriptor("guest_pages", type="instant", unit="bytes", base=2, exponent=12))
    assert (pages.name, pages.scale) == ("p_guest_pages_bytes", 4096.0)
    assert kvm_metric("p", descriptor("rx_bytes", unit="bytes")).name == "p_rx_bytes"
    assert kvm_metric("p", descriptor("weird-name.x")).name == "p_weird_name_x"
    assert kvm_metric("p", descriptor("spins_total")).name == "p_spins"


def test_histograms_and_unknown_kinds_are_not_exported():
    assert kvm_metric("p", descriptor("halt_wait_hist", type="log-hist", unit="seconds", exponent=-9,
                                      size=32)) is None
    assert kvm_metric("p", descriptor("x", type="unknown(0x5)")) is None
    assert kvm_metric("p", descriptor("x", unit="unknown(0x50)")) is None
    assert kvm_metric("p", descriptor("x", base=0)) is None


def test_duplicate_names_keep_the_first():
    metrics = kvm_metrics("p", [descriptor("wait_ns", unit="seconds", exponent=-9),
                                descriptor("wait_us", unit="seconds", exponent=-6)])
    assert [m.descriptor.name for m in metrics] == ["wait_ns"]


def test_every_statistic_of_a_real_vcpu_and_vm_gets_a_valid_unique_name(kvm_available):
    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        with StatsReader(vcpu.stats_fd()) as vcpu_stats, StatsReader(vm.stats_fd()) as vm_stats:
            for prefix, reader in (("mpvmm_kvm_vcpu", vcpu_stats), ("mpvmm_kvm_vm", vm_stats)):
                metrics = kvm_metrics(prefix, reader.descriptors)
                exported = {m.descriptor.name for m in metrics}
                skipped = {d.name for d in reader.descriptors} - exported
                assert all(d.is_histogram for d in reader.descriptors if d.name in skipped), skipped
                assert len({m.name for m in metrics}) == len(metrics)
                assert all(METRIC_NAME.match(m.name) for m in metrics)
            names = {m.descriptor.name: m for m in kvm_metrics("mpvmm_kvm_vcpu", vcpu_stats.descriptors)}
            histograms = kvm_histograms("mpvmm_kvm_vcpus", vcpu_stats.descriptors)
    # Every histogram the skipped list held is exported summed over the vCPUs, with its total.
    assert {h.descriptor.name for h in histograms} == {
        d.name for d in vcpu_stats.descriptors if d.is_histogram}
    assert all(METRIC_NAME.match(h.name) and h.total is not None for h in histograms)
    assert "mpvmm_kvm_vcpus_halt_wait_seconds" in {h.name for h in histograms}
    assert names["exits"].name == "mpvmm_kvm_vcpu_exits" and names["exits"].kind == "counter"
    assert len(names) >= 40  # docs/design.md, "What KVM offers here": 47 per-vCPU stats, three of them histograms


HALT_WAIT_HIST = descriptor("halt_wait_hist", type="log-hist", unit="seconds", exponent=-9, size=5)
HALT_WAIT_NS = descriptor("halt_wait_ns", unit="seconds", exponent=-9)


def test_bucket_bounds_follow_kvm_half_open_buckets():
    # [0,1) [1,2) [2,4) [4,8) [8,+Inf): largest integer sample of each but the last.
    assert bucket_upper_bounds(HALT_WAIT_HIST) == [0, 1, 3, 7]
    # [0,10) [10,20) [20,+Inf)
    assert bucket_upper_bounds(descriptor("h", type="linear-hist", size=3, bucket_size=10)) == [9, 19]
    assert bucket_upper_bounds(descriptor("h", type="linear-hist", size=3)) is None  # no bucket size
    assert bucket_upper_bounds(descriptor("h")) is None


def test_histogram_is_named_in_base_units_and_finds_its_total():
    histogram, = kvm_histograms("p", [HALT_WAIT_NS, HALT_WAIT_HIST, descriptor("exits")])
    assert histogram.name == "p_halt_wait_seconds"
    assert histogram.bucket_labels == ("0.0", "1e-09", "3e-09", "7e-09", "+Inf")
    assert histogram.total is HALT_WAIT_NS
    lonely, = kvm_histograms("p", [HALT_WAIT_HIST])
    assert lonely.total is None
    assert kvm_histograms("p", [descriptor("h", type="log-hist", unit="unknown(0x50)", size=4)]) == []


def test_histogram_family_sums_vcpus_cumulatively():
    histogram, = kvm_histograms("p", [HALT_WAIT_NS, HALT_WAIT_HIST])
    per_vcpu = [{"halt_wait_hist": [1, 0, 2, 0, 1], "halt_wait_ns": 1 + 2 + 3 + 100},
                {"halt_wait_hist": [0, 3, 0, 1, 0], "halt_wait_ns": 3 + 5}]
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram_family(histogram, per_vcpu).samples}
    assert samples == {
        ("p_halt_wait_seconds_bucket", "0.0"): 1,
        ("p_halt_wait_seconds_bucket", "1e-09"): 4,
        ("p_halt_wait_seconds_bucket", "3e-09"): 6,
        ("p_halt_wait_seconds_bucket", "7e-09"): 7,
        ("p_halt_wait_seconds_bucket", "+Inf"): 8,
        ("p_halt_wait_seconds_count", None): 8,
        ("p_halt_wait_seconds_sum", None): pytest.approx(114e-9),
    }
