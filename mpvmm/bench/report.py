"""Bench results: run samples folded into records, the table and the JSON.

One record per (workload, runner, transport, cpus), from the median of its
repeats. Ratios and efficiencies use each workload's figure of merit: exits
per second; for the device workloads the guest's own count of its device
accesses per second (every access to a device of the device model, whether
it exited or KVM took it in the kernel: with coalesced writes and doorbells
an access is no longer an exit); for ``compute``, which makes no exits in
its window, the guest's compute iterations per second. Every record has
exits and device accesses per second beside it.
"""

import json
import os
import platform
import statistics
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from mpvmm import __version__
from mpvmm.guest.abi import DEVICE_ACCESS_OPS
from mpvmm.output import write_atomically
from mpvmm.supervisor.summary import latency_quantile

RECORD_VERSION = 2
# Workloads whose work is not exits: the guest op that measures them.
GUEST_WORK_OPS = {"compute": "compute_iterations"}
# Workloads whose work is device accesses, each an exit only where KVM does not take it.
DEVICE_WORKLOADS = ("pio-device", "mmio", "uart", "doorbell", "writes")
DEVICE_ACCESSES = "device_accesses"


def throughput_unit(workload: str) -> str:
    """What the workload's figure of merit counts: "exits", "device_accesses", or the guest op that measures it."""
    return DEVICE_ACCESSES if workload in DEVICE_WORKLOADS else GUEST_WORK_OPS.get(workload, "exits")


def short_unit(unit: str) -> str:
    return unit.rsplit("_", 1)[-1]  # "compute_iterations" -> "iterations", for column headers


def host_info() -> dict:
    """What the figures depend on: the CPU, the cores, the kernel, Python, the load."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python_version": platform.python_version(),
        # These machines run KVM nested on PVM, where an exit costs ~25 us (docs/design.md, "PVM hosts").
        "kvm_nested_on_pvm": os.path.isdir("/sys/module/kvm_pvm"),
        "load_average": list(os.getloadavg()),  # at the start; the bench adds load_average_after
        "mpvmm_version": __version__,
    }


def _median_int(values) -> int:
    return round(statistics.median(values))


def sample_throughput(sample) -> float:
    """One run's figure of merit per second (see throughput_unit)."""
    unit = throughput_unit(sample.workload)
    if unit == DEVICE_ACCESSES:
        return device_accesses(sample)
    return (sum(sample.exits) if unit == "exits" else sample.guest_ops[unit]) / sample.seconds


def device_accesses(sample) -> float:
    """The guest's device accesses per second in one run's window."""
    return sum(sample.guest_ops[op] for op in DEVICE_ACCESS_OPS) / sample.seconds


def build_records(samples, host: dict) -> list[dict]:
    """One record per (workload, runner, transport, cpus), in the order first measured."""
    groups = defaultdict(list)
    for sample in samples:
        groups[(sample.workload, sample.runner, sample.transport, sample.cpus)].append(sample)
    records = {}
    for (workload, runner, transport, cpus), runs in groups.items():
        buckets = [sum(column) for column in zip(*(r.sync_buckets for r in runs))]
        syncs = sum(buckets)
        rates = [sum(r.exits) / r.seconds for r in runs]
        records[(workload, runner, transport, cpus)] = {
            "workload": workload,
            "runner": runner,
            "transport": transport,
            "cpus": cpus,
            "seconds": statistics.median(r.seconds for r in runs),
            "repeats": len(runs),
            "exits_total": _median_int(sum(r.exits) for r in runs),
            "exits_per_second": statistics.median(rates),
            "exits_per_second_runs": rates,
            "exits_per_second_per_vcpu": [statistics.median(r.exits[i] / r.seconds for r in runs)
                                          for i in range(cpus)],
            "throughput_unit": throughput_unit(workload),
            "throughput_per_second": statistics.median(sample_throughput(r) for r in runs),
            "device_accesses_per_second": statistics.median(device_accesses(r) for r in runs),
            "guest_ops_per_second": {op: statistics.median(r.guest_ops[op] / r.seconds for r in runs)
                                     for op in runs[0].guest_ops if any(r.guest_ops[op] for r in runs)},
            "ratio_to_raw": None,
            "scaling_efficiency": None,
            # The bucket bounds are powers of two of 1 us: a quantile is its bucket's upper bound.
            "sync_latency_p50_seconds": latency_quantile(buckets, 0.5) if syncs else None,
            "sync_latency_p99_seconds": latency_quantile(buckets, 0.99) if syncs else None,
            "sync_latency_mean_seconds": sum(r.sync_sum_seconds for r in runs) / syncs if syncs else None,
            "pinned": all(r.pinned_cpus for r in runs),
            "host": host,
            "record_version": RECORD_VERSION,
        }
    for (workload, runner, transport, cpus), record in records.items():
        value = record["throughput_per_second"]
        raw = records.get((workload, "raw", None, cpus))
        if raw and raw["throughput_per_second"] > 0:
            record["ratio_to_raw"] = value / raw["throughput_per_second"]
        one = records.get((workload, runner, transport, 1))
        if one and one["throughput_per_second"] > 0:
            record["scaling_efficiency"] = value / (cpus * one["throughput_per_second"])
    return list(records.values())


def write_json(records: list[dict], path: str) -> None:
    """The records as JSON, replacing ``path`` whole, as ``mpvmm start --report`` does."""
    write_atomically(path, (json.dumps(records, indent=2) + "\n").encode())


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _microseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "inf" if seconds == float("inf") else f"{seconds * 1e6:.0f}"


def render_tables(records: list[dict], console: Console) -> None:
    """One table per workload: every runner at every vCPU count."""
    by_workload = defaultdict(list)
    for record in records:
        by_workload[record["workload"]].append(record)
    for workload, rows in by_workload.items():
        unit = short_unit(throughput_unit(workload))
        table = Table(title=f"{workload}: {unit} per second (median of {rows[0]['repeats']}, "
                            f"{rows[0]['seconds']:.1f} s windows)")
        for column in ("runner", "transport", "vCPUs", f"{unit}/s", "per vCPU", "ratio to raw", "scaling eff.",
                       "exits/s", "device acc/s", "sync p50 us", "sync p99 us", "sync mean us"):
            table.add_column(column, justify="left" if column in ("runner", "transport") else "right")
        for record in sorted(rows, key=lambda r: (r["cpus"], _runner_order(r["runner"]), r["transport"] or "")):
            value = record["throughput_per_second"]
            table.add_row(
                record["runner"], record["transport"] or "-", str(record["cpus"]), _number(value),
                _number(value / record["cpus"]),
                _number(record["ratio_to_raw"], 2), _number(record["scaling_efficiency"], 2),
                _number(record["exits_per_second"]), _number(record["device_accesses_per_second"]),
                _microseconds(record["sync_latency_p50_seconds"]),
                _microseconds(record["sync_latency_p99_seconds"]),
                _microseconds(record["sync_latency_mean_seconds"]),
            )
        console.print(table)
    if records:
        host = records[0]["host"]
        console.print(f"host: {host['cpu_model']}, {host['usable_cores']} of {host['cores']} cores usable, "
                      f"kernel {host['kernel']}, Python {host['python_version']}"
                      + (", KVM nested on PVM" if host["kvm_nested_on_pvm"] else ""))


def _runner_order(runner: str) -> int:
    order = ("raw", "native", "python", "process")
    return order.index(runner) if runner in order else len(order)
