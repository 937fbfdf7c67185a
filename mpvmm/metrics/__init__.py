"""Prometheus metrics of a running VM, collected at scrape time (docs/design.md, "Metrics").

``exporter`` serves ``/metrics``; ``collector`` turns the per-vCPU stats
pages, KVM's binary stats, the guest's reports and the device model's
counters into metric families; ``kvm_names`` names KVM's statistics;
``dashboard`` generates the Grafana dashboard; ``top`` is ``mpvmm top``.
"""

DEFAULT_METRICS_ADDR = "127.0.0.1"
# Where `mpvmm start` serves /metrics unless told otherwise (--metrics-port).
DEFAULT_METRICS_PORT = 9477
DEFAULT_METRICS_URL = f"http://{DEFAULT_METRICS_ADDR}:{DEFAULT_METRICS_PORT}/metrics"
