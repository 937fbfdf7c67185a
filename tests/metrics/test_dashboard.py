"""The committed Grafana files: generated, complete, and consistent with each other.

test_prometheus.py runs every query of the dashboard against real data.
"""

import json
import re
import subprocess
from pathlib import Path

from mpvmm.metrics import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_PORT
from mpvmm.metrics.dashboard import render
from tests.metrics.conftest import debian_prometheus_tool

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mpvmm.json"
PER_VCPU_METRIC = re.compile(r"\b(mpvmm_vcpu_\w+|mpvmm_kvm_vcpu_\w+|mpvmm_guest_ops_total)\{([^}]*)\}")


def targets() -> list[tuple[dict, dict]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel, target) for panel in panels for target in panel.get("targets", [])]


def test_committed_dashboard_is_what_the_code_generates():
    assert DASHBOARD.read_text() == render(), (
        "grafana/dashboards/mpvmm.json is stale: "
        "python -m mpvmm.metrics.dashboard --output grafana/dashboards/mpvmm.json")


def test_every_per_vcpu_query_follows_the_vcpu_variable():
    for panel, target in targets():
        for metric, selector in PER_VCPU_METRIC.findall(target["expr"]):
            assert 'vcpu=~"$vcpu"' in selector, f"{panel['title']}: {metric}{{{selector}}}"


def test_the_panels_users_asked_for_are_there():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel.get("targets", []))
             for panel in dashboard["panels"]}
    everything = " ".join(exprs.values())
    assert "sum by (reason) (rate(mpvmm_vcpu_exits_total" in everything
    assert any("mpvmm_kvm_vcpu_exits_total" in e and "mpvmm_vcpu_exits_total" in e for e in exprs.values())
    assert "mpvmm_vcpu_exit_route_total" in everything
    assert "histogram_quantile(0.5," in everything and "histogram_quantile(0.99," in everything
    assert any(p["type"] == "heatmap" and "sync_exit_latency_seconds_bucket" in exprs[p["title"]]
               for p in dashboard["panels"])
    assert "mpvmm_vcpu_cpu_seconds_total" in everything
    assert "mpvmm_device_requests_total" in everything
    assert any("mpvmm_guest_ops_total" in e and "mpvmm_vcpu_exits_total" in e for e in exprs.values())
    assert any(p.get("repeat") == "vcpu" for p in dashboard["panels"])
    stacked = [p for p in dashboard["panels"]
               if p["type"] == "timeseries"
               and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"]
    assert any("by (reason)" in exprs[p["title"]] for p in stacked)


def test_variables_ids_and_grid():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["vcpu"]["multi"] and variables["vcpu"]["includeAll"]
    assert "label_values(mpvmm_vcpu_exits_total, vcpu)" in variables["vcpu"]["definition"]
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs))


def test_provisioning_compose_and_scrape_config_agree():
    compose = (GRAFANA / "compose.yaml").read_text()
    assert "image: prom/prometheus" in compose and "image: grafana/grafana-oss" in compose
    assert "./dashboards:/var/lib/grafana/dashboards" in compose
    assert "./provisioning:/etc/grafana/provisioning" in compose
    assert "path: /var/lib/grafana/dashboards" in (GRAFANA / "provisioning/dashboards/mpvmm.yaml").read_text()
    datasource = (GRAFANA / "provisioning/datasources/prometheus.yaml").read_text()
    listen = re.search(r"--web.listen-address=([\d.]+:\d+)", compose).group(1)
    assert f"url: http://{listen}" in datasource
    scrape = (GRAFANA / "prometheus.yml").read_text()
    assert f'targets: ["{DEFAULT_METRICS_ADDR}:{DEFAULT_METRICS_PORT}"]' in scrape
    check = subprocess.run(
        [debian_prometheus_tool("promtool"), "check", "config", str(GRAFANA / "prometheus.yml")],
        capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
