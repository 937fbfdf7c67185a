"""Prometheus names and units for KVM's binary statistics.

KVM describes each statistic itself (type, unit, base and exponent), so the
metrics are derived from the descriptors a stats fd returns, never from a
hard-coded list: a newer kernel's new statistics appear on their own.
"""

import re
from dataclasses import dataclass

from mpvmm.kvm.stats import StatsDescriptor

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

    Histograms are not exported: each is 32 buckets per vCPU (the series of a
    64-vCPU VM would be dominated by them) and every one KVM has today comes
    with a cumulative total of the same time (``halt_wait_hist`` beside
    ``halt_wait_ns``), which is exported. Statistics of a type or unit this
    reader does not know are skipped rather than exported with a wrong unit.
    """
    if desc.is_histogram or desc.size != 1 or desc.base == 0:
        return None
    if desc.type == "cumulative":
        kind = "counter"
    elif desc.type in ("instant", "peak"):
        kind = "gauge"
    else:
        return None
    if desc.unit not in ("none", "boolean") and desc.unit not in _UNIT_SUFFIXES:
        return None
    base = _INVALID_NAME_CHARS.sub("_", desc.name)
    suffix = _UNIT_SUFFIXES.get(desc.unit, "")
    if desc.unit == "seconds":
        for scale_suffix in _SCALE_SUFFIXES:
            base = base.removesuffix(scale_suffix)
    if suffix and base.endswith(suffix):
        base = base.removesuffix(suffix)
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


def kvm_metrics(prefix: str, descriptors: list[StatsDescriptor]) -> list[KvmMetric]:
    """Every exported statistic of one stats fd, the first of any two with one name."""
    metrics, names = [], set()
    for desc in descriptors:
        metric = kvm_metric(prefix, desc)
        if metric is not None and metric.name not in names:
            names.add(metric.name)
            metrics.append(metric)
    return metrics
