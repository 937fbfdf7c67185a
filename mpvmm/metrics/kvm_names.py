"""Prometheus names and units for KVM's binary statistics.

KVM describes each statistic itself (type, unit, base and exponent), so the
metrics are derived from the descriptors a stats fd returns, never from a
hard-coded list: a newer kernel's new statistics appear on their own.
"""

import re
from dataclasses import dataclass

from prometheus_client.utils import floatToGoString

from mpvmm.kvm.binary_stats import StatsDescriptor

# KVM names its time statistics by their scale ("halt_wait_ns"); once the
# value is converted to seconds the scale suffix would lie, so it goes.
_SCALE_SUFFIXES = ("_ns", "_us", "_ms")
_UNIT_SUFFIXES = {"seconds": "_seconds", "bytes": "_bytes", "cycles": "_cycles"}
_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True)
class KvmMetric:
    """How one KVM statistic is exported."""

    name: str  # without the ``_total`` a counter gets in the exposition
    kind: str  # "counter" or "gauge"
    scale: float  # multiplies the raw value into the metric's base unit
    documentation: str
    descriptor: StatsDescriptor


def kvm_metric(prefix: str, desc: StatsDescriptor) -> KvmMetric | None:
    """The metric for ``desc``, or None for a statistic that is not exported.

    Histograms are not exported per vCPU (32 buckets each would dominate the
    series of a 64-vCPU VM); ``kvm_histograms`` exports them summed over the
    vCPUs. Statistics of a type or unit this reader does not know are skipped
    rather than exported with a wrong unit.
    """
    if desc.is_histogram or desc.size != 1 or desc.base == 0:
        return None
    if desc.type == "cumulative":
        kind = "counter"
    elif desc.type in ("instant", "peak"):
        kind = "gauge"
    else:
        return None
    if not _known_unit(desc):
        return None
    base, suffix = _stem(desc.name, desc.unit), _UNIT_SUFFIXES.get(desc.unit, "")
    if kind == "counter":
        base = base.removesuffix("_total")  # the exposition adds it back exactly once
    unit_text = f", {desc.unit}" if desc.unit != "none" else ""
    return KvmMetric(
        name=f"{prefix}_{base}{suffix}",
        kind=kind,
        scale=float(desc.base) ** desc.exponent,
        documentation=f"KVM statistic {desc.name} ({desc.type}{unit_text})",
        descriptor=desc,
    )


def _known_unit(desc: StatsDescriptor) -> bool:
    return desc.unit in ("none", "boolean") or desc.unit in _UNIT_SUFFIXES


def _stem(name: str, unit: str) -> str:
    """A statistic's name without the scale and unit suffixes its metric name replaces."""
    stem = _INVALID_NAME_CHARS.sub("_", name)
    if unit == "seconds":
        for scale_suffix in _SCALE_SUFFIXES:
            stem = stem.removesuffix(scale_suffix)
    suffix = _UNIT_SUFFIXES.get(unit)
    return stem.removesuffix(suffix) if suffix else stem


def kvm_metrics(prefix: str, descriptors: list[StatsDescriptor]) -> list[KvmMetric]:
    """Every exported statistic of one stats fd, the first of any two with one name."""
    metrics, names = [], set()
    for desc in descriptors:
        metric = kvm_metric(prefix, desc)
        if metric is not None and metric.name not in names:
            names.add(metric.name)
            metrics.append(metric)
    return metrics


@dataclass(frozen=True)
class KvmHistogram:
    """How one of KVM's per-vCPU histograms is exported: summed over every vCPU."""

    name: str
    documentation: str
    bucket_labels: tuple[str, ...]  # the ``le`` of every bucket, "+Inf" last
    descriptor: StatsDescriptor
    # The cumulative statistic that totals the same samples (KVM adds each
    # sample to both: halt_wait_ns beside halt_wait_hist): the histogram's _sum.
    total: StatsDescriptor | None


def bucket_upper_bounds(desc: StatsDescriptor) -> list[int] | None:
    """The largest sample each bucket but the last can hold, in the statistic's unit.

    KVM's samples are integers and its buckets half-open (api.rst): a log
    histogram's are [0, 1), [1, 2), [2, 4) ... [2**(size-2), +Inf), a linear
    one's [0, b), [b, 2b) ... [b*(size-1), +Inf). Prometheus's ``le`` is
    inclusive, so bucket [lo, hi) has le = hi - 1 exactly.
    """
    if desc.type == "log-hist":
        return [(1 << i) - 1 for i in range(desc.size - 1)]
    if desc.type == "linear-hist" and desc.bucket_size > 0:
        return [desc.bucket_size * (i + 1) - 1 for i in range(desc.size - 1)]
    return None


def kvm_histograms(prefix: str, descriptors: list[StatsDescriptor]) -> list[KvmHistogram]:
    """Every histogram of a vCPU stats fd that can be exported, with its total where KVM keeps one."""
    totals = {(_stem(d.name, d.unit), d.unit, d.base, d.exponent): d
              for d in descriptors if d.type == "cumulative" and d.size == 1}
    histograms = []
    for desc in descriptors:
        bounds = bucket_upper_bounds(desc) if desc.is_histogram else None
        if not bounds or desc.base == 0 or not _known_unit(desc):
            continue
        stem = _stem(desc.name.removesuffix("_hist"), desc.unit)
        histograms.append(KvmHistogram(
            name=f"{prefix}_{stem}{_UNIT_SUFFIXES.get(desc.unit, '')}",
            documentation=f"KVM statistic {desc.name} ({desc.type}, {desc.unit}), summed over every vCPU",
            bucket_labels=tuple(floatToGoString(in_base_units(bound, desc)) for bound in bounds) + ("+Inf",),
            descriptor=desc,
            total=totals.get((stem, desc.unit, desc.base, desc.exponent)),
        ))
    return histograms


def in_base_units(value: int, desc: StatsDescriptor) -> float:
    """A raw value of ``desc`` in its base unit (nanoseconds to seconds, pages to bytes)."""
    # Dividing by 10**9 rather than multiplying by 1e-9 keeps 3 ns at 3e-09, not 3.0000000000000004e-09.
    if desc.exponent < 0:
        return value / float(desc.base) ** -desc.exponent
    return value * float(desc.base) ** desc.exponent
