"""The metrics of one VM, read at scrape time from what the run already counts.

Nothing here runs on the exit path: the run loop keeps its counters in the
per-vCPU stats pages whatever happens, and a scrape only reads them, KVM's
stats fds (one ``pread`` each), the guest's reports in guest RAM, each vCPU
thread's ``/proc`` stat and, once, the device model's counters over its
control socket, and each virtio device process's over its own.

The sources belong to the run and are torn down with it, some by unmapping
memory: the collector reads them only between ``attach`` and ``detach``,
under a lock, so a scrape in flight finishes before ``detach`` returns and
no scrape ever touches an unmapped page.
"""

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mpvmm.errors import MpvmmError
from mpvmm.kvm import bindings as kb
from mpvmm.kvm.binary_stats import StatsReader
from mpvmm.metrics.kvm_names import KvmHistogram, KvmMetric, in_base_units, kvm_histograms, kvm_metrics
from mpvmm.metrics.virtio_metrics import virtio_families
from mpvmm.vcpu_worker import stats_page

# Exit reasons exported for every vCPU from the start, so that their rate()
# is right from the first exit on; any other reason is exported once some
# vCPU has seen it (a series per vCPU for each of KVM's 40 reasons would be
# mostly zeros).
BASELINE_EXIT_REASONS = (
    kb.KVM_EXIT_IO, kb.KVM_EXIT_MMIO, kb.KVM_EXIT_INTR, kb.KVM_EXIT_HLT, kb.KVM_EXIT_SHUTDOWN,
    kb.KVM_EXIT_FAIL_ENTRY, kb.KVM_EXIT_INTERNAL_ERROR, kb.KVM_EXIT_SYSTEM_EVENT,
)
LATENCY_BUCKET_LABELS = tuple(floatToGoString(b) for b in stats_page.LATENCY_BOUNDS_SECONDS) + ("+Inf",)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class VmSources:
    """What a scrape reads. The collector owns (and closes) only the KVM readers."""

    stats_pages: list[stats_page.VcpuStats]
    worker_pids: Sequence[int] = field(default_factory=list)  # 0: a thread of this process
    guest_counts: Callable[[int], object] | None = None  # index -> GuestCounts, or None (a kernel)
    device_stats: Callable[[], dict] | None = None
    kvm_vcpu_readers: list[StatsReader | None] = field(default_factory=list)
    kvm_vm_reader: StatsReader | None = None
    migration: Callable[[], dict | None] | None = None  # the VM's migration report, in or out
    virtio_stats: Callable[[], dict[str, dict]] | None = None  # VirtioDevices.stats

    def close(self) -> None:
        for reader in [*self.kvm_vcpu_readers, self.kvm_vm_reader]:
            if reader is not None:
                reader.close()
        self.kvm_vcpu_readers, self.kvm_vm_reader = [], None


def open_kvm_reader(open_fd: Callable[[], int]) -> StatsReader | None:
    """A reader of the stats fd ``open_fd()`` returns, or None where KVM has none."""
    try:
        return StatsReader(open_fd())
    except MpvmmError:
        return None


def thread_cpu_seconds(pid: int, tid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of thread ``tid`` of process ``pid`` (0: this one); None once gone."""
    try:
        with open(f"/proc/{pid or 'self'}/task/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields 14 and 15 of proc(5), counted after the ")" that ends the name.
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


class VmCollector(Collector):
    """A prometheus_client collector of one VM's metrics; ``info`` labels mpvmm_vm_info."""

    def __init__(self, info: dict[str, str]):
        self._info = info
        self._lock = threading.Lock()
        self._sources: VmSources | None = None
        self._kvm_vcpu_metrics: list[KvmMetric] = []
        self._kvm_vm_metrics: list[KvmMetric] = []
        self._kvm_histograms: list[KvmHistogram] = []
        self._device_stats_failed = False

    def attach(self, sources: VmSources) -> None:
        with self._lock:
            self._sources = sources
            first_reader = next((r for r in sources.kvm_vcpu_readers if r is not None), None)
            # Every vCPU of a VM has the same descriptors: name them once.
            self._kvm_vcpu_metrics = (
                kvm_metrics("mpvmm_kvm_vcpu", first_reader.descriptors) if first_reader else []
            )
            self._kvm_histograms = (
                kvm_histograms("mpvmm_kvm_vcpus", first_reader.descriptors) if first_reader else []
            )
            self._kvm_vm_metrics = (
                kvm_metrics("mpvmm_kvm_vm", sources.kvm_vm_reader.descriptors)
                if sources.kvm_vm_reader else []
            )
            self._device_stats_failed = False

    def detach(self) -> None:
        """Stop reading the run's sources; waits for a scrape in flight. Idempotent."""
        with self._lock:
            sources, self._sources = self._sources, None
        if sources is not None:
            sources.close()

    def collect(self) -> list[Metric]:
        info = GaugeMetricFamily("mpvmm_vm_info", "The running VM; always 1", labels=list(self._info))
        info.add_metric(list(self._info.values()), 1)
        families: list[Metric] = [info]
        with self._lock:
            if self._sources is not None:
                families += self._vcpu_families(self._sources)
                families += self._kvm_families(self._sources)
                families += self._guest_families(self._sources)
                families += self._device_families(self._sources)
                if self._sources.virtio_stats is not None:
                    families += virtio_families(self._sources.virtio_stats())
                if self._sources.migration is not None:
                    families += migration_families(self._sources.migration())
        return families

    # --- The run loop's stats pages. ---

    def _vcpu_families(self, sources: VmSources) -> list[Metric]:
        exits = CounterMetricFamily("mpvmm_vcpu_exits", "Exits to userspace by KVM exit reason",
                                    labels=["vcpu", "reason"])
        routes = CounterMetricFamily("mpvmm_vcpu_exit_route", "Userspace exits by how they were handled: "
                                     "native (in the run loop), posted or sync (to the device model)",
                                     labels=["vcpu", "route"])
        latency = HistogramMetricFamily("mpvmm_vcpu_sync_exit_latency_seconds",
                                        "Round trip of sync exits to the device model", labels=["vcpu"])
        runs = CounterMetricFamily("mpvmm_vcpu_runs", "KVM_RUN calls that returned an exit", labels=["vcpu"])
        kicks = CounterMetricFamily("mpvmm_vcpu_kicks", "KVM_RUN calls interrupted by a stop or pause kick",
                                    labels=["vcpu"])
        sleep = CounterMetricFamily("mpvmm_vcpu_sleep_seconds", "Time vCPUs slept on the guest's sleep port",
                                    labels=["vcpu"])
        stalls = CounterMetricFamily("mpvmm_vcpu_posted_stalls", "Requests that waited for room in a full queue or ring",
                                     labels=["vcpu"])
        wakeups = CounterMetricFamily("mpvmm_vcpu_server_wakeups", "Times the vCPU woke the sleeping device model "
                                      "(ring transport; the rest of its requests found it awake)", labels=["vcpu"])
        reply_sleeps = CounterMetricFamily("mpvmm_vcpu_reply_sleeps", "Replies the vCPU waited for asleep "
                                           "rather than spinning (ring transport)", labels=["vcpu"])
        cpu = CounterMetricFamily("mpvmm_vcpu_cpu_seconds", "CPU time of the vCPU worker thread",
                                  labels=["vcpu", "mode"])
        pages = sources.stats_pages
        exit_counts = [list(page.exits) for page in pages]
        reasons = set(BASELINE_EXIT_REASONS)
        reasons.update(r for counts in exit_counts for r, n in enumerate(counts) if n)
        for index, (page, counts) in enumerate(zip(pages, exit_counts)):
            vcpu = str(index)
            for reason in sorted(reasons):
                exits.add_metric([vcpu, kb.exit_reason_name(reason)], counts[reason])
            for route, count in zip(stats_page.PATHS, page.paths):
                routes.add_metric([vcpu, route], count)
            latency.add_metric([vcpu], cumulative_buckets(LATENCY_BUCKET_LABELS, page.sync_latency_buckets),
                               page.sync_latency_sum_ns / 1e9)
            runs.add_metric([vcpu], page.runs)
            kicks.add_metric([vcpu], page.interrupted)
            sleep.add_metric([vcpu], page.sleep_ns / 1e9)
            stalls.add_metric([vcpu], page.posted_stalls)
            wakeups.add_metric([vcpu], page.server_wakeups)
            reply_sleeps.add_metric([vcpu], page.reply_sleeps)
            pid = sources.worker_pids[index] if index < len(sources.worker_pids) else 0
            times = thread_cpu_seconds(pid, page.tid) if page.tid else None
            if times is not None:
                cpu.add_metric([vcpu, "user"], times[0])
                cpu.add_metric([vcpu, "system"], times[1])
        return [exits, routes, latency, runs, kicks, sleep, stalls, wakeups, reply_sleeps, cpu]

    # --- KVM's binary stats. ---

    def _kvm_families(self, sources: VmSources) -> list[Metric]:
        families = {m.name: _family(m, ["vcpu"]) for m in self._kvm_vcpu_metrics}
        per_vcpu = []
        for index, reader in enumerate(sources.kvm_vcpu_readers):
            if reader is None:
                continue
            values = reader.read()
            per_vcpu.append(values)
            for metric in self._kvm_vcpu_metrics:
                families[metric.name].add_metric([str(index)], values[metric.descriptor.name] * metric.scale)
        result = list(families.values())
        if per_vcpu:
            result += [histogram_family(h, per_vcpu) for h in self._kvm_histograms]
        if sources.kvm_vm_reader is not None:
            values = sources.kvm_vm_reader.read()
            for metric in self._kvm_vm_metrics:
                family = _family(metric, [])
                family.add_metric([], values[metric.descriptor.name] * metric.scale)
                result.append(family)
        return result

    # --- The guest's own reports. ---

    def _guest_families(self, sources: VmSources) -> list[Metric]:
        if sources.guest_counts is None:
            return []
        counts = [sources.guest_counts(index) for index in range(len(sources.stats_pages))]
        if any(vcpu_counts is None for vcpu_counts in counts):
            return []  # a guest that keeps no counts for us
        ops = CounterMetricFamily("mpvmm_guest_ops", "What the built-in guest says it did, by op",
                                  labels=["vcpu", "op"])
        for index, vcpu_counts in enumerate(counts):
            for op, count in vcpu_counts.ops.items():
                ops.add_metric([str(index), op], count)
        return [ops]

    # --- The device model's counters. ---

    def _device_families(self, sources: VmSources) -> list[Metric]:
        if sources.device_stats is None or self._device_stats_failed:
            return []
        try:
            stats = sources.device_stats()
        except MpvmmError:
            # The device model is gone or stuck: the run will notice and end;
            # asking again would make every later scrape wait for the timeout.
            self._device_stats_failed = True
            return []
        return device_families(stats)


def _by_label(name: str, documentation: str, label: str, values: dict) -> Metric:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, count in values.items():
        family.add_metric([key], count)
    return family


def device_families(stats: dict) -> list[Metric]:
    """Metric families of a device model's ``stats`` dict (DeviceModelClient.stats)."""
    requests = CounterMetricFamily("mpvmm_device_requests", "Requests the device model handled, by device",
                                   labels=["device", "op"])
    for device, ops in stats.get("requests", {}).items():
        for op, count in ops.items():
            requests.add_metric([device, op], count)
    unmapped = CounterMetricFamily("mpvmm_device_unmapped_requests",
                                   "Requests to addresses no device claims", labels=["space", "op"])
    for space, ops in stats.get("unmapped", {}).items():
        for op, count in ops.items():
            unmapped.add_metric([space, op], count)
    return [
        requests,
        _by_label("mpvmm_device_coalesced_writes", "Writes KVM took into its coalesced ring and the device "
                  "model drained, by device (no exit)", "device", stats.get("coalesced", {})),
        _by_label("mpvmm_device_doorbells", "Doorbell rings KVM signalled through an eventfd, by device (no exit)",
                  "device", stats.get("doorbells", {})),
        unmapped,
        _by_label("mpvmm_device_rejected_messages", "Malformed request messages dropped, by reason", "reason",
                  stats.get("rejected", {})),
        _by_label("mpvmm_device_errors", "Device emulation failures, by device", "device",
                  stats.get("device_errors", {})),
        *_process_families(stats.get("process", {})),
        *console_families(stats.get("console", {})),
    ]


# The device model process's own figures: (family class, metric name, key in its stats, help).
_COALESCED_RING_METRICS = (
    (CounterMetricFamily, "mpvmm_coalesced_ring_drains", "drains", "Drains of KVM's coalesced ring that found writes"),
    (CounterMetricFamily, "mpvmm_coalesced_ring_entries", "entries", "Writes drained from KVM's coalesced ring"),
    (GaugeMetricFamily, "mpvmm_coalesced_ring_occupancy_entries", "pending",
     "Writes waiting in KVM's coalesced ring at the scrape"),
    (GaugeMetricFamily, "mpvmm_coalesced_ring_peak_entries", "peak",
     "The most writes found waiting in KVM's coalesced ring at once"),
    (GaugeMetricFamily, "mpvmm_coalesced_ring_capacity_entries", "capacity",
     "Writes KVM's coalesced ring holds before writes exit again"),
)
_RING_TRANSPORT_METRICS = (
    (CounterMetricFamily, "mpvmm_transport_server_wakeups", "wakeups",
     "Times a vCPU's eventfd woke the sleeping device model"),
    (CounterMetricFamily, "mpvmm_transport_polled_hits", "polled_hits",
     "Requests the device model found while polling, before it slept"),
    (CounterMetricFamily, "mpvmm_transport_sleeps", "sleeps", "Times the device model went to sleep on its rings"),
    (CounterMetricFamily, "mpvmm_transport_poll_seconds", "poll_seconds",
     "Time the device model spent polling its rings"),
    (CounterMetricFamily, "mpvmm_transport_poll_preempted", "poll_preempted",
     "Polls the device model ended because another task wanted its core"),
    (GaugeMetricFamily, "mpvmm_transport_poll_window_seconds", "poll_window_seconds",
     "How long the device model now polls before it sleeps (adaptive)"),
)


_TRANSPORT_METRICS = (
    (CounterMetricFamily, "mpvmm_transport_reordered", "reordered",
     "Requests taken from their channels out of the order the vCPUs made them, performed in order"),
)


def _process_families(process: dict) -> list[Metric]:
    """The coalesced ring's and the transports' figures, where the run has them."""
    families = []
    for values, metrics in ((process.get("coalesced_ring"), _COALESCED_RING_METRICS),
                            (process if "reordered" in process else None, _TRANSPORT_METRICS),
                            (process if process.get("transport") == "ring" else None, _RING_TRANSPORT_METRICS)):
        for family_class, name, key, documentation in metrics if values else ():
            family = family_class(name, documentation)
            family.add_metric([], values[key])
            families.append(family)
    return families


def console_families(console: dict) -> list[Metric]:
    """The guest console's bytes written and lost, and the writes that failed (a full disk, a closed pipe)."""
    families = []
    for key, name, documentation in (
        ("written_bytes", "mpvmm_console_written_bytes", "Guest console bytes written to the console file or stdout"),
        ("lost_bytes", "mpvmm_console_lost_bytes", "Guest console bytes lost to failed writes"),
        ("write_errors", "mpvmm_console_write_errors", "Failed writes of guest console output"),
    ):
        if key in console:
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], console[key])
            families.append(family)
    return families


def migration_families(report: dict | None) -> list[Metric]:
    """A migration's rounds, pages per round, downtime and time, labelled by this VMM's role in it."""
    if report is None:
        return []
    role = [report["role"]]
    rounds = GaugeMetricFamily("mpvmm_migration_rounds", "Rounds of pages a live migration sent",
                               labels=["role"])
    rounds.add_metric(role, report["rounds"])
    pages = GaugeMetricFamily("mpvmm_migration_round_pages", "Pages sent in each round of a live migration",
                              labels=["role", "round"])
    for index, count in enumerate(report["pages_per_round"], 1):
        pages.add_metric(role + [str(index)], count)
    families: list[Metric] = [rounds, pages]
    if report.get("downtime_ms") is not None:
        downtime = GaugeMetricFamily("mpvmm_migration_downtime_seconds",
                                     "From the pause on the source to the VM running on the destination",
                                     labels=["role"])
        downtime.add_metric(role, report["downtime_ms"] / 1000)
        families.append(downtime)
    duration = report.get("total_seconds", report.get("receive_seconds"))
    if duration is not None:
        total = GaugeMetricFamily("mpvmm_migration_duration_seconds", "How long a live migration took in all",
                                  labels=["role"])
        total.add_metric(role, duration)
        families.append(total)
    return families


def cumulative_buckets(labels: Sequence[str], counts: Sequence[int]) -> list[tuple[str, int]]:
    """(le, count) pairs: each bucket kept alone, as Prometheus wants them, le-cumulative."""
    buckets, cumulative = [], 0
    for label, count in zip(labels, counts):
        cumulative += count
        buckets.append((label, cumulative))
    return buckets


def histogram_family(histogram: KvmHistogram, per_vcpu: Sequence[dict]) -> Metric:
    """One KVM histogram summed over the vCPUs' stats (StatsReader.read() of each)."""
    name = histogram.descriptor.name
    counts = [sum(bucket) for bucket in zip(*(values[name] for values in per_vcpu))]
    total = None
    if histogram.total is not None:
        total = in_base_units(sum(values[histogram.total.name] for values in per_vcpu), histogram.total)
    family = HistogramMetricFamily(histogram.name, histogram.documentation)
    family.add_metric([], cumulative_buckets(histogram.bucket_labels, counts), total)
    return family


def _family(metric: KvmMetric, labels: list[str]) -> Metric:
    if metric.kind == "counter":
        return CounterMetricFamily(metric.name, metric.documentation, labels=labels)
    return GaugeMetricFamily(metric.name, metric.documentation, labels=labels)
