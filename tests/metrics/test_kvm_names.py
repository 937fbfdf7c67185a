"""Naming KVM's binary statistics: made-up descriptors, then every one a real vCPU has."""

import re

from mpvmm.kvm.stats import StatsDescriptor, StatsReader
from mpvmm.kvm.system import Kvm
from mpvmm.metrics.kvm_names import kvm_metric, kvm_metrics

METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def descriptor(name, type="cumulative", unit="none", base=10, exponent=0, size=1):
    return StatsDescriptor(name=name, type=type, unit=unit, base=base, exponent=exponent, size=size,
                           offset=0, bucket_size=0)


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
    assert names["exits"].name == "mpvmm_kvm_vcpu_exits" and names["exits"].kind == "counter"
    assert len(names) >= 40  # DESIGN.md: 47 per-vCPU stats here, three of them histograms
