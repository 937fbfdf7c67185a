"""``mpvmm top``: per-vCPU exit rates of a running VM, in the spirit of kvm_stat.

It reads only the VM's ``/metrics`` endpoint, so it runs as any user, on a
VM started by someone else, and sees exactly what Prometheus sees. Rates are
differences between two scrapes divided by the time between them. Below the
vCPUs, a table per device says how its accesses arrived (requests through
an exit, writes KVM coalesced, doorbells KVM signalled), with the coalesced
ring's and the transport's figures under it.
"""

import http.client
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from mpvmm.arguments import TOP_INTERVAL_MAX, check_number, format_size
from mpvmm.errors import MpvmmError, UsageError
from mpvmm.vcpu_worker.stats_page import PATHS

# The whole scrape, connect to last byte: what the endpoint allows a request
# itself. A 64-vCPU VM's answer (380 KiB) takes about 50 ms.
SCRAPE_DEADLINE_SECONDS = 5.0
# About 6 KiB per vCPU: room for a 4096-vCPU VM, and a bound on the memory
# an endless or hostile answer can take.
MAX_BODY_BYTES = 32 << 20
READ_SIZE = 64 * 1024
# Reasons that always get a column; any other gets one once it has happened.
ALWAYS_SHOWN_REASONS = ("io", "mmio")


class ScrapeError(MpvmmError):
    """The metrics endpoint could not be reached or did not answer with metrics (exit 1)."""


@dataclass
class Scrape:
    """The samples of one scrape: (name, sorted label pairs) -> value, and when."""

    seconds: float  # time.monotonic() when the answer arrived
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: value for (sample_name, labels), value in self.samples.items() if sample_name == name}

    def info(self) -> dict[str, str]:
        return dict(next(iter(self.series("mpvmm_vm_info")), ()))


def parse(text: str, seconds: float) -> Scrape:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(seconds, samples)


def scrape(url: str, deadline_seconds: float = SCRAPE_DEADLINE_SECONDS) -> Scrape:
    """One scrape of ``url``, parsed; a ScrapeError for anything but an mpvmm endpoint's answer."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url}: not an http:// or https:// URL")
    try:
        body = _fetch(parts, deadline_seconds)
    except ScrapeError as err:
        raise ScrapeError(f"{url}: {err}") from err
    except (OSError, http.client.HTTPException, ValueError) as err:
        # An OSError's strerror is the short reason ("Connection refused").
        reason = (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__
        raise ScrapeError(f"cannot reach {url}: {reason} (is `mpvmm start` running?)") from err
    try:
        result = parse(body.decode(), time.monotonic())
    except ValueError as err:  # UnicodeDecodeError included
        raise ScrapeError(f"{url} did not answer with Prometheus metrics: {err}") from err
    if not result.series("mpvmm_vm_info"):
        raise ScrapeError(f"{url} is not an mpvmm metrics endpoint (no mpvmm_vm_info)")
    return result


def _fetch(parts: urllib.parse.SplitResult, deadline_seconds: float) -> bytes:
    """The body of a GET, at most MAX_BODY_BYTES and within ``deadline_seconds`` in all.

    A socket timeout bounds each read, not the whole answer: a server that
    sends a byte now and then, or streams for ever, would never trip it. So
    a timer shuts the socket down at the deadline, which ends whatever read
    is waiting, and the body is read a chunk at a time against the cap.
    """
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=deadline_seconds)
    expired = threading.Event()
    timer = threading.Timer(deadline_seconds, _cut, (connection, expired))
    timer.start()
    try:
        # A TLS handshake happens in connect, so the timer runs from before it.
        connection.connect()
        body = _read_body(connection, parts, expired)
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise ScrapeError(f"no complete answer within {deadline_seconds:g} s") from None
        raise
    finally:
        timer.cancel()
        connection.close()
    if expired.is_set():  # the cut looked like the end of the body
        raise ScrapeError(f"no complete answer within {deadline_seconds:g} s")
    return body


def _read_body(connection: http.client.HTTPConnection, parts: urllib.parse.SplitResult,
               expired: threading.Event) -> bytes:
    if expired.is_set():  # the deadline passed while connecting, before the timer could cut anything
        raise ScrapeError("connecting took the whole deadline")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection.request("GET", path)
    response = connection.getresponse()
    if response.status != 200:
        raise ScrapeError(f"HTTP {response.status} {response.reason}")
    if response.length is not None and response.length > MAX_BODY_BYTES:
        raise ScrapeError(f"the answer is larger than {format_size(MAX_BODY_BYTES)}: not a metrics endpoint")
    body = bytearray()
    while not expired.is_set() and (chunk := response.read1(READ_SIZE)):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ScrapeError(f"the answer is larger than {format_size(MAX_BODY_BYTES)}: not a metrics endpoint")
    return bytes(body)


def _cut(connection: http.client.HTTPConnection, expired: threading.Event) -> None:
    """At the deadline: end the read in progress (it returns end of file or an error)."""
    expired.set()
    sock = connection.sock  # None while still connecting: connect has its own timeout
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _by_vcpu(scrape: Scrape, name: str, key: str | None = None) -> dict[tuple[int, str], float]:
    """{(vcpu, value of label ``key`` or ""): sample value} for the series of ``name``."""
    values = {}
    for labels, value in scrape.series(name).items():
        label_map = dict(labels)
        if "vcpu" in label_map:
            values[(int(label_map["vcpu"]), label_map.get(key, "") if key else "")] = value
    return values


def _rates(before: Scrape, after: Scrape, name: str, key: str | None = None) -> dict[tuple[int, str], float]:
    elapsed = after.seconds - before.seconds
    old = _by_vcpu(before, name, key)
    rates = {}
    for series, value in _by_vcpu(after, name, key).items():
        delta = value - old.get(series, 0.0)
        rates[series] = (delta if delta >= 0 else value) / elapsed  # a drop is a restart: count from 0
    return rates


def _interval_quantile(before: Scrape, after: Scrape, vcpu: int, quantile: float) -> float | None:
    """The upper bound of the latency bucket holding ``quantile`` of this interval's sync exits."""
    name = "mpvmm_vcpu_sync_exit_latency_seconds_bucket"
    old, new = _by_vcpu(before, name, "le"), _by_vcpu(after, name, "le")
    buckets = sorted(((float(le), count - old.get((v, le), 0.0)) for (v, le), count in new.items() if v == vcpu))
    if not buckets or buckets[-1][1] <= 0:
        return None
    for bound, cumulative in buckets:
        if cumulative >= quantile * buckets[-1][1]:
            return bound
    return None


def _rate_text(value: float) -> str:
    return f"{value:.0f}"


def rate_table(before: Scrape, after: Scrape) -> Table:
    """One row per vCPU and a total: exits/s by reason and by route, like kvm_stat's."""
    info = after.info()
    exits = _rates(before, after, "mpvmm_vcpu_exits_total", "reason")
    routes = _rates(before, after, "mpvmm_vcpu_exit_route_total", "route")
    kvm_exits = _rates(before, after, "mpvmm_kvm_vcpu_exits_total")
    cpu = _rates(before, after, "mpvmm_vcpu_cpu_seconds_total", "mode")
    totals = _by_vcpu(after, "mpvmm_vcpu_exits_total", "reason")
    vcpus = sorted({vcpu for vcpu, _ in totals})
    reasons = sorted({reason for (_, reason), count in totals.items() if count} | set(ALWAYS_SHOWN_REASONS))
    elapsed = after.seconds - before.seconds
    # No vertical lines, like kvm_stat: a 64-vCPU table still fits 80 columns.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"mpvmm top: {info.get('cpus', '?')} vCPUs, {info.get('runner', '?')} runner, "
                        f"{info.get('workload', '?')} workload; per second over {elapsed:.1f} s")
    columns = ["vcpu", "exits", *reasons, *PATHS, "sync p99 us", "kvm exits", "cpu %"]
    for column in columns:
        # Never shorter than its longest word: "nati…" says nothing in a narrow terminal.
        table.add_column(column, justify="right", min_width=max(len(word) for word in column.split()))
    rate_sums = [0.0] * (1 + len(reasons) + len(PATHS))
    kvm_sum = cpu_sum = 0.0
    for vcpu in vcpus:
        by_reason = [exits.get((vcpu, reason), 0.0) for reason in reasons]
        rates = [sum(by_reason), *by_reason, *(routes.get((vcpu, route), 0.0) for route in PATHS)]
        rate_sums = [total + rate for total, rate in zip(rate_sums, rates)]
        kvm_rate = kvm_exits.get((vcpu, ""))
        kvm_sum += kvm_rate or 0.0
        cpu_percent = 100 * (cpu.get((vcpu, "user"), 0.0) + cpu.get((vcpu, "system"), 0.0))
        cpu_sum += cpu_percent
        p99 = _interval_quantile(before, after, vcpu, 0.99)
        table.add_row(
            str(vcpu), *(_rate_text(rate) for rate in rates),
            "-" if p99 is None else ("inf" if p99 == float("inf") else f"{p99 * 1e6:.0f}"),
            "-" if kvm_rate is None else _rate_text(kvm_rate),
            f"{cpu_percent:.0f}",
        )
    table.add_section()
    table.add_row("all", *(_rate_text(rate) for rate in rate_sums), "", _rate_text(kvm_sum), f"{cpu_sum:.0f}")
    return table


def _labelled_rates(before: Scrape, after: Scrape, name: str, key: str) -> dict[str, float]:
    """{value of label ``key``: rate} of a counter over the interval, summed over its other labels."""
    elapsed = after.seconds - before.seconds
    totals: dict[str, list[float]] = {}
    for scrape, index in ((before, 0), (after, 1)):
        for labels, value in scrape.series(name).items():
            totals.setdefault(dict(labels).get(key, ""), [0.0, 0.0])[index] += value
    return {label: max(new - old, 0.0) / elapsed for label, (old, new) in totals.items()}


def _rate(before: Scrape, after: Scrape, name: str) -> float:
    return sum(_labelled_rates(before, after, name, "").values())


def _gauge(scrape: Scrape, name: str) -> float | None:
    values = list(scrape.series(name).values())
    return values[0] if values else None


def device_table(before: Scrape, after: Scrape) -> Table:
    """Per device: requests, coalesced writes and doorbells per second; the ring and transport below."""
    requests = _labelled_rates(before, after, "mpvmm_device_requests_total", "device")
    coalesced = _labelled_rates(before, after, "mpvmm_device_coalesced_writes_total", "device")
    doorbells = _labelled_rates(before, after, "mpvmm_device_doorbells_total", "device")
    notes = []
    if _gauge(after, "mpvmm_coalesced_ring_capacity_entries") is not None:
        fallbacks = _labelled_rates(before, after, "mpvmm_vcpu_exit_route_total", "route").get("fallback", 0.0)
        notes.append(f"coalesced ring: {_rate(before, after, 'mpvmm_coalesced_ring_drains_total'):.0f} drains/s, "
                     f"{fallbacks:.0f} full-ring fallbacks/s, "
                     f"{_gauge(after, 'mpvmm_coalesced_ring_occupancy_entries'):.0f} waiting "
                     f"(peak {_gauge(after, 'mpvmm_coalesced_ring_peak_entries'):.0f} of "
                     f"{_gauge(after, 'mpvmm_coalesced_ring_capacity_entries'):.0f})")
    window = _gauge(after, "mpvmm_transport_poll_window_seconds")
    if window is not None:
        notes.append(f"ring transport: {_rate(before, after, 'mpvmm_transport_server_wakeups_total'):.0f} wake-ups/s, "
                     f"{_rate(before, after, 'mpvmm_transport_polled_hits_total'):.0f} polled hits/s, "
                     f"{_rate(before, after, 'mpvmm_vcpu_reply_sleeps_total'):.0f} vCPU reply sleeps/s, "
                     f"poll window {window * 1e6:.0f} us")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption="; ".join(notes) or None,
                  title="device accesses per second: requests (exits) and in KVM")
    for column in ("device", "requests", "coalesced", "doorbells"):
        table.add_column(column, justify="left" if column == "device" else "right")
    for device in sorted(set(requests) | set(coalesced) | set(doorbells)):
        table.add_row(device, *(_rate_text(rates.get(device, 0.0)) for rates in (requests, coalesced, doorbells)))
    return table


def run_top(url: str, once: bool = False, interval: float = 1.0, console: Console | None = None) -> int:
    """Show rates until Ctrl-C, or (``once``) print one table from two scrapes and return."""
    check_number(interval, "--interval", 0, TOP_INTERVAL_MAX, low_allowed=False)
    before = scrape(url)
    if once:
        # Every column whole even when stdout is a pipe or a file (80 columns).
        console = console or Console(width=max(Console().width, 132))
        time.sleep(interval)
        after = scrape(url)
        console.print(Group(rate_table(before, after), device_table(before, after)))
        return 0
    console = console or Console()
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                time.sleep(max(0.0, before.seconds + interval - time.monotonic()))
                after = scrape(url)
                live.update(Group(rate_table(before, after), device_table(before, after)), refresh=True)
                before = after
    except KeyboardInterrupt:
        return 0
