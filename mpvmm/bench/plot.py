"""``--plot``: throughput against vCPUs, one line per runner and transport, one panel per workload.

matplotlib is an optional extra (``pip install 'mpvmm[plot]'``); it is drawn
through the Agg canvas directly, so no GUI backend or global pyplot state is
touched.
"""

import importlib.util
import math
from collections import defaultdict

from mpvmm.errors import UsageError

RUNNER_STYLES = {
    "raw": {"color": "black", "marker": "s"},
    "native": {"color": "tab:blue", "marker": "o"},
    "python": {"color": "tab:red", "marker": "^"},
    "process": {"color": "tab:green", "marker": "D"},
}
TRANSPORT_LINES = {"ring": "-", "mq": "--"}
PANEL_INCHES = (4.8, 3.6)


def require_matplotlib() -> None:
    """Fail with a usage error before any run if --plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'mpvmm[plot]'")


def write_plot(records: list[dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_workload = defaultdict(list)
    for record in records:
        by_workload[record["workload"]].append(record)
    columns = min(3, max(1, len(by_workload)))
    rows = math.ceil(len(by_workload) / columns) or 1
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    host = records[0]["host"] if records else {}
    figure.suptitle(f"mpvmm bench: {host.get('cpu_model', '?')}, {host.get('usable_cores', '?')} cores"
                    + (", KVM nested on PVM" if host.get("kvm_nested_on_pvm") else ""))
    for index, (workload, rows_of_workload) in enumerate(by_workload.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        lines = defaultdict(list)
        for record in rows_of_workload:
            lines[(record["runner"], record["transport"])].append((record["cpus"], record["throughput_per_second"]))
        for (runner, transport), points in lines.items():
            points.sort()
            style = {**RUNNER_STYLES.get(runner, {}), "linestyle": TRANSPORT_LINES.get(transport, "-")}
            axes.plot([p[0] for p in points], [p[1] for p in points],
                      label=f"{runner}/{transport}" if transport else runner, **style)
        raw = dict(lines.get(("raw", None), ()))
        if 1 in raw and len(raw) > 1:
            counts = sorted(raw)
            axes.plot(counts, [raw[1] * n for n in counts], linestyle=":", color="grey",
                      label="raw x N (linear)")
        unit = rows_of_workload[0]["throughput_unit"]
        axes.set_title(workload)
        axes.set_xlabel("vCPUs")
        axes.set_ylabel(f"{unit} per second")
        axes.set_xticks(sorted({r["cpus"] for r in rows_of_workload}))
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=100)
