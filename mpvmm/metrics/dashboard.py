"""The Grafana dashboard of a running VM, generated as JSON.

``python -m mpvmm.metrics.dashboard --output grafana/dashboards/mpvmm.json``
writes the committed dashboard; tests/metrics/test_dashboard.py checks that
the committed file is what this module generates, and test_prometheus.py
evaluates every query against a real Prometheus scraping a real VM.

Conventions the tests rely on: every query filters vCPUs with
``vcpu=~"$vcpu"``; a target whose legend names ``{{vcpu}}`` (or a panel
repeated by ``vcpu``) draws one series per vCPU.
"""

import argparse
import json
import sys

from mpvmm.guest.abi import OP_PATHS

DASHBOARD_UID = "mpvmm-vm"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VCPU = 'vcpu=~"$vcpu"'
RATE = "$__rate_interval"
# Ops of the guest that each cost one exit unless KVM takes them in the kernel
# (abi.OP_PATHS): beside the exits the VMM saw, the gap is KVM's share.
GUEST_EXIT_OPS = "|".join(OP_PATHS)
KVM_EXIT_STATS = ("io_exits", "mmio_exits", "halt_exits", "irq_exits", "irq_window_exits",
                  "signal_exits", "insn_emulation", "hypercalls")
PANEL_WIDTH, PANEL_HEIGHT = 12, 8


def target(expr: str, legend: str, **extra) -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, **extra}


def timeseries(title: str, description: str, targets: list[dict], unit: str = "short",
               stacked: bool = False, **extra) -> dict:
    custom = {"fillOpacity": 20 if stacked else 0, "lineWidth": 1, "showPoints": "never",
              "stacking": {"group": "A", "mode": "normal" if stacked else "none"}}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        **extra,
    }


def stat(title: str, description: str, expr: str, unit: str = "short") -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, title, instant=True, range=False)],
        "fieldConfig": {"defaults": {"unit": unit, "decimals": 0}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "none", "graphMode": "area", "textMode": "value"},
    }


def heatmap(title: str, description: str, expr: str) -> dict:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [target(expr, "{{le}}", format="heatmap")],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": "s"},
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "tooltip": {"show": True, "yHistogram": True}, "legend": {"show": True}},
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def _rate(metric: str, selector: str = VCPU) -> str:
    return f"rate({metric}{{{selector}}}[{RATE}])"


def panels() -> list[dict]:
    exits, routes = "mpvmm_vcpu_exits_total", "mpvmm_vcpu_exit_route_total"
    kvm_exits, buckets = "mpvmm_kvm_vcpu_exits_total", "mpvmm_vcpu_sync_exit_latency_seconds_bucket"
    in_kernel = f"sum by (vcpu) ({_rate(kvm_exits)}) - sum by (vcpu) ({_rate(exits)})"
    guest_exit_ops = f'{VCPU}, op=~"{GUEST_EXIT_OPS}"'
    io_and_mmio = f'{VCPU}, reason=~"io|mmio"'
    fallback = f'{VCPU}, route="fallback"'
    return [
        stat("exits/s to userspace", "Exits the run loops saw, all selected vCPUs",
             f"sum({_rate(exits)})", "ops"),
        stat("exits/s in KVM", "Exits KVM handled itself (KVM's exits statistic minus userspace exits)",
             f"clamp_min(sum({_rate(kvm_exits)}) - sum({_rate(exits)}), 0)", "ops"),
        stat("sync p99", "99th percentile of the sync round trip to the device model",
             f"histogram_quantile(0.99, sum by (le) ({_rate(buckets)}))", "s"),
        stat("vCPUs", "vCPUs exporting metrics", f"count(count by (vcpu) ({exits}{{{VCPU}}}))"),
        row("Exits to userspace"),
        timeseries("Exit rate by reason", "Userspace exits per second of all selected vCPUs, by KVM exit reason",
                   [target(f"sum by (reason) ({_rate(exits)})", "{{reason}}")], "ops", stacked=True),
        timeseries("Exit rate per vCPU", "Userspace exits per second, one series per vCPU",
                   [target(f"sum by (vcpu) ({_rate(exits)})", "vcpu{{vcpu}}")], "ops", stacked=True),
        timeseries("vCPU $vcpu: exit rate by reason", "One panel per selected vCPU",
                   [target(f"sum by (vcpu, reason) ({_rate(exits)})", "{{reason}}")], "ops", stacked=True,
                   repeat="vcpu", repeatDirection="h", maxPerRow=4),
        row("Userspace vs in-kernel exits"),
        timeseries("Userspace vs in-kernel exits",
                   "KVM counts every exit (its exits statistic); those it did not hand to userspace "
                   "it handled in the kernel",
                   [target(f"sum({_rate(exits)})", "to userspace"),
                    target(f"clamp_min(sum({_rate(kvm_exits)}) - sum({_rate(exits)}), 0)", "in KVM")],
                   "ops", stacked=True),
        timeseries("In-kernel exits per vCPU", "KVM's exits minus userspace exits, per vCPU",
                   [target(f"clamp_min({in_kernel}, 0)", "vcpu{{vcpu}}")], "ops"),
        timeseries("vCPU halts (KVM histograms)",
                   "How long halted vCPUs waited, and polled before a wake-up, from KVM's own log "
                   "histograms; summed over every vCPU, so the vCPU filter does not apply. The built-in "
                   "guest runs at CPL 3 and never halts; a Linux guest does",
                   [target(f"histogram_quantile({q}, sum by (le) "
                           f"(rate(mpvmm_kvm_vcpus_{name}_seconds_bucket[{RATE}])))", f"{name} p{int(q * 100)}")
                    for name in ("halt_wait", "halt_poll_success") for q in (0.5, 0.99)], "s"),
        timeseries("KVM exit statistics", "KVM's own per-vCPU counters, all selected vCPUs",
                   [target(f"sum({_rate(f'mpvmm_kvm_vcpu_{name}_total')})", name) for name in KVM_EXIT_STATS],
                   "ops"),
        row("Exit routes and the device model"),
        timeseries("Exit routes", "native: handled in the run loop; posted: sent to the device model, "
                   "vCPU resumes; sync: vCPU waits for the device model's reply",
                   [target(f"sum by (route) ({_rate(routes)})", "{{route}}")], "ops", stacked=True),
        timeseries("Exit routes per vCPU", "Exits per second by route, per vCPU",
                   [target(f"sum by (vcpu, route) ({_rate(routes)})", "vcpu{{vcpu}} {{route}}")], "ops"),
        timeseries("Sync round trip p50 / p99", "How long a sync exit waits for the device model",
                   [target(f"histogram_quantile(0.5, sum by (le) ({_rate(buckets)}))", "p50"),
                    target(f"histogram_quantile(0.99, sum by (le) ({_rate(buckets)}))", "p99"),
                    target(f"histogram_quantile(0.99, sum by (vcpu, le) ({_rate(buckets)}))", "vcpu{{vcpu}} p99")],
                   "s"),
        heatmap("Sync round trip heatmap", "Sync exits per latency bucket",
                f"sum by (le) (increase({buckets}{{{VCPU}}}[{RATE}]))"),
        timeseries("Device requests", "Requests the device model handled, by device and op",
                   [target(f"sum by (device, op) (rate(mpvmm_device_requests_total[{RATE}]))", "{{device}} {{op}}")],
                   "reqps", stacked=True),
        row("In-kernel device routes and the transport"),
        timeseries("Device accesses: in KVM vs userspace",
                   "Test-device writes KVM coalesced and doorbells it signalled, none of them an exit, beside "
                   "the requests that reached the device model through an exit",
                   [target(f"sum(rate(mpvmm_device_coalesced_writes_total[{RATE}]))", "coalesced writes (in KVM)"),
                    target(f"sum(rate(mpvmm_device_doorbells_total[{RATE}]))", "doorbells (in KVM)"),
                    target(f"sum(rate(mpvmm_device_requests_total[{RATE}]))", "requests (userspace exits)")],
                   "reqps", stacked=True),
        timeseries("In-kernel accesses by device", "Coalesced writes and doorbells per device",
                   [target(f"sum by (device) (rate(mpvmm_device_coalesced_writes_total[{RATE}]))",
                           "{{device}} coalesced"),
                    target(f"sum by (device) (rate(mpvmm_device_doorbells_total[{RATE}]))", "{{device}} doorbells")],
                   "reqps"),
        timeseries("Coalesced ring", "Drains of KVM's coalesced ring, the writes waiting in it, and the writes "
                   "that found it full and exited (route fallback)",
                   [target(f"rate(mpvmm_coalesced_ring_drains_total[{RATE}])", "drains/s"),
                    target(f"sum({_rate(routes, fallback)})", "full-ring fallbacks/s"),
                    target("mpvmm_coalesced_ring_occupancy_entries", "entries waiting"),
                    target("mpvmm_coalesced_ring_peak_entries", "peak entries")]),
        timeseries("Transport: wake-ups vs polled hits",
                   "Ring transport: requests that had to wake the sleeping device model, requests it found while "
                   "polling, and replies the vCPUs slept for instead of spinning",
                   [target(f"rate(mpvmm_transport_server_wakeups_total[{RATE}])", "device model woken"),
                    target(f"rate(mpvmm_transport_polled_hits_total[{RATE}])", "polled hits"),
                    target(f"sum({_rate('mpvmm_vcpu_reply_sleeps_total')})", "vCPU reply sleeps")], "ops"),
        timeseries("Device model problems", "Unmapped accesses, rejected messages and device errors",
                   [target(f"sum(rate(mpvmm_device_unmapped_requests_total[{RATE}]))", "unmapped"),
                    target(f"sum(rate(mpvmm_device_rejected_messages_total[{RATE}]))", "rejected"),
                    target(f"sum(rate(mpvmm_device_errors_total[{RATE}]))", "device errors")],
                   "reqps"),
        row("CPU and memory"),
        timeseries("vCPU thread CPU usage", "CPU time of each vCPU worker thread (1 = one host CPU)",
                   [target(f"sum by (vcpu, mode) ({_rate('mpvmm_vcpu_cpu_seconds_total')})",
                           "vcpu{{vcpu}} {{mode}}")], "percentunit", stacked=True),
        timeseries("Process CPU usage", "The supervisor (all its threads) and the device-model process",
                   [target(f"rate(mpvmm_supervisor_process_cpu_seconds_total[{RATE}])", "supervisor"),
                    target(f"rate(mpvmm_device_model_process_cpu_seconds_total[{RATE}])", "device model")],
                   "percentunit"),
        timeseries("Process memory", "Resident memory of the supervisor (guest RAM it touched included) "
                   "and of the device model",
                   [target("mpvmm_supervisor_process_resident_memory_bytes", "supervisor"),
                    target("mpvmm_device_model_process_resident_memory_bytes", "device model")],
                   "bytes"),
        row("Guest"),
        timeseries("Guest ops vs VMM-observed exits",
                   "The accesses each vCPU's guest says it made that exit unless KVM takes them (coalesced "
                   "writes, doorbells) beside the io and mmio exits the VMM saw: the gap is KVM's share",
                   [target(f"sum by (vcpu) ({_rate('mpvmm_guest_ops_total', guest_exit_ops)})",
                           "vcpu{{vcpu}} guest"),
                    target(f"sum by (vcpu) ({_rate(exits, io_and_mmio)})", "vcpu{{vcpu}} VMM")], "ops"),
        timeseries("Guest ops by op", "What the guest says it did, all selected vCPUs",
                   [target(f"sum by (op) ({_rate('mpvmm_guest_ops_total')})", "{{op}}")], "ops"),
    ]


def _layout(items: list[dict]) -> list[dict]:
    """Ids, refIds and grid positions: stats four to a line, panels two, rows and repeats one."""
    x = y = line_height = 0
    for panel_id, panel in enumerate(items, start=1):
        panel["id"] = panel_id
        for ref, item in enumerate(panel.get("targets", [])):
            item["refId"] = chr(ord("A") + ref)
        width, height = {"row": (24, 1), "stat": (6, 4)}.get(panel["type"], (PANEL_WIDTH, PANEL_HEIGHT))
        if "repeat" in panel:
            width = 24  # Grafana splits a repeated panel's line between its copies
        if x + width > 24 or panel["type"] == "row":
            x, y, line_height = 0, y + line_height, 0
        panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, line_height = x + width, max(line_height, height)
    return items


def dashboard() -> dict:
    return {
        "uid": DASHBOARD_UID,
        "title": "mpvmm VM",
        "description": "Exit rates, routes, device-model latency and CPU of an mpvmm VM (mpvmm start)",
        "tags": ["mpvmm", "kvm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "5s",
        "schemaVersion": 39,
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {"refresh_intervals": ["1s", "5s", "10s", "30s", "1m"]},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "hide": 0, "current": {}},
            {"name": "vcpu", "label": "vCPU", "type": "query", "datasource": DATASOURCE,
             "definition": "label_values(mpvmm_vcpu_exits_total, vcpu)",
             "query": {"query": "label_values(mpvmm_vcpu_exits_total, vcpu)", "refId": "vcpu"},
             "refresh": 2, "sort": 3, "multi": True, "includeAll": True, "allValue": ".*", "hide": 0,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}},
        ]},
        "panels": _layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write mpvmm's Grafana dashboard JSON.")
    parser.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    args = parser.parse_args(argv)
    if args.output:
        with open(args.output, "w") as f:
            f.write(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
