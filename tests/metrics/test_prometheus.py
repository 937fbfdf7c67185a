"""Every query of the committed Grafana dashboard, evaluated by a real Prometheus
that scrapes a real 8-vCPU VM every second. The virtio row's queries need a VM
with virtio devices: tests/virtio_device/test_metrics.py evaluates them."""

import json
from pathlib import Path

from mpvmm.supervisor.run import RunConfig, Supervisor
from tests.metrics.conftest import PrometheusServer

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "mpvmm.json"
CPUS = 8
# What Grafana puts in place of $vcpu when all eight are selected, and of its
# interval macros (four scrapes at 1 s, as Grafana's $__rate_interval would be).
ALL_VCPUS = "|".join(str(i) for i in range(CPUS))
INTERVAL = "5s"
SCRAPES_BEFORE_QUERYING = 7


def grafana_substitute(expr: str) -> str:
    for macro in ("$__rate_interval", "${__rate_interval}", "$__interval", "${__interval}"):
        expr = expr.replace(macro, INTERVAL)
    return expr.replace("${vcpu}", ALL_VCPUS).replace("$vcpu", ALL_VCPUS)


def dashboard_targets(virtio: bool = False) -> list[tuple[dict, dict]]:
    """The dashboard's queries: those of the virtio row (``virtio``, which need a VM with devices), or the rest."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel, target) for panel in panels for target in panel.get("targets", [])
            if ("mpvmm_virtio_" in target["expr"]) == virtio]


def is_per_vcpu(panel: dict, target: dict) -> bool:
    """The dashboard's convention: a per-vCPU series is labelled by vcpu, or its panel repeats by vCPU."""
    return "{{vcpu}}" in target["legendFormat"] or panel.get("repeat") == "vcpu"


def test_every_dashboard_query_returns_data(tmp_path, no_leaks):
    targets = dashboard_targets()
    answers = []

    def query_everything(vm):
        server = PrometheusServer(tmp_path, f"127.0.0.1:{vm.metrics.port}")
        try:
            server.wait_ready()
            server.wait_for_scrapes(SCRAPES_BEFORE_QUERYING)
            for panel, target in targets:
                answers.append(server.query(grafana_substitute(target["expr"])))
        finally:
            server.close()

    config = RunConfig(cpus=CPUS, memory=64 << 20, workload="demo", seconds=0.5,
                       console=str(tmp_path / "console"), metrics_port=0)
    result = Supervisor(config, on_started=query_everything).run()
    assert result.exit_code == 0, result.status
    assert len(answers) == len(targets) > 20

    everyone = {str(i) for i in range(CPUS)}
    for (panel, target), answer in zip(targets, answers):
        where = f"panel {panel['title']!r} target {target['refId']}: {target['expr']}"
        assert answer, f"no data for {where}"
        if is_per_vcpu(panel, target):
            assert {series["metric"].get("vcpu") for series in answer} == everyone, where

    by_title = {panel["title"]: answer for (panel, _), answer in zip(targets, answers)}
    per_vcpu_rates = {s["metric"]["vcpu"]: float(s["value"][1]) for s in by_title["Exit rate per vCPU"]}
    assert all(rate > 0 for rate in per_vcpu_rates.values()), per_vcpu_rates
