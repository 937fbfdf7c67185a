"""The end-of-run summary: a per-vCPU table for people, the same as JSON for tools."""

import dataclasses
import json

from rich.console import Console
from rich.table import Table

from mpvmm import __version__
from mpvmm.guest import abi
from mpvmm.output import write_atomically
from mpvmm.vcpu_worker.outcome import report_fields
from mpvmm.vcpu_worker.stats_page import LATENCY_BOUNDS_SECONDS, PATHS

REPORT_VERSION = 1


def latency_quantile(buckets: list[int], quantile: float) -> float | None:
    """The upper bound of the bucket holding ``quantile`` of the round trips."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bound, count in zip(LATENCY_BOUNDS_SECONDS + (float("inf"),), buckets):
        seen += count
        if seen >= quantile * total:
            return bound
    return float("inf")


def guest_exits(ops: dict[str, int]) -> int:
    """The guest's port and MMIO accesses: each is an exit unless KVM takes it in the kernel."""
    return sum(ops[op] for op in abi.OP_PATHS)


def _microseconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return "inf" if seconds == float("inf") else f"{seconds * 1e6:.0f}"


def render_summary(result, console: Console) -> None:
    # A kernel has no built-in workload: config.workload is only its unused default there.
    guest = "a Linux kernel" if result.config.kernel else f"{result.config.workload} workload"
    table = Table(title=f"mpvmm: {result.config.cpus} vCPUs, {result.config.runner} runner, "
                        f"{guest}, {result.seconds:.2f} s")
    # vCPUs that ran in processes of their own have a pid and CPU time to show.
    per_process = any(vcpu.cpu_seconds is not None for vcpu in result.vcpus)
    for column in ("vcpu", "outcome", "io", "mmio", "other", *PATHS,
                   "sync p50 us", "sync p99 us", "exits/s", "guest I/O") + (("pid", "cpu s") if per_process else ()):
        table.add_column(column, justify="left" if column == "outcome" else "right")
    for vcpu in result.vcpus:
        process = (str(vcpu.pid), "-" if vcpu.cpu_seconds is None else f"{vcpu.cpu_seconds:.2f}") if per_process else ()
        io, mmio = vcpu.exits.get("io", 0), vcpu.exits.get("mmio", 0)
        other = sum(vcpu.exits.values()) - io - mmio
        table.add_row(
            str(vcpu.index), report_fields(vcpu.outcome)[0], str(io), str(mmio), str(other),
            *(str(vcpu.paths[p]) for p in PATHS),
            _microseconds(latency_quantile(vcpu.sync_latency_buckets, 0.5)),
            _microseconds(latency_quantile(vcpu.sync_latency_buckets, 0.99)),
            f"{(io + mmio) / result.seconds:.0f}" if result.seconds else "-",
            "-" if vcpu.guest is None else str(guest_exits(vcpu.guest.ops)),
            *process,
        )
    console.print(table)
    counted = [v.guest for v in result.vcpus if v.guest is not None]
    ops = {op: sum(counts.ops[op] for counts in counted) for op in abi.OPS}
    done = ", ".join(f"{op} {count}" for op, count in ops.items() if count)
    console.print(f"guest ops: {done or 'none'}")
    device_model = result.device_model
    if device_model.get("requests"):
        requests = sum(sum(by_op.values()) for by_op in device_model["requests"].values())
        console.print(f"device model: {requests} requests, in KVM {sum(device_model['coalesced'].values())} "
                      f"coalesced writes and {sum(device_model['doorbells'].values())} doorbells, "
                      f"{sum(v.paths['fallback'] for v in result.vcpus)} full-ring fallbacks; "
                      f"{result.config.transport} transport")
    if ops["atomic_increments"]:
        console.print(f"atomics: shared counters total {result.atomic_total}, "
                      f"guest increments {ops['atomic_increments']}")
    guest_console = result.device_model.get("console", {})
    if guest_console.get("lost_bytes"):
        console.print(f"console: {guest_console['written_bytes']} bytes written, {guest_console['lost_bytes']} lost "
                      f"in {guest_console['write_errors']} failed writes ({guest_console['error']})")
    dropped_input = result.device_model.get("terminal_input", {}).get("dropped_bytes")
    if dropped_input:
        console.print(f"terminal input: {dropped_input} bytes typed ahead past what may wait for the guest, dropped")
    for name, stats in result.virtio.items():
        console.print(virtio_line(name, stats))
    for part, why in result.not_collected.items():
        console.print(f"not collected: {part.replace('_', ' ')}: {why}")
    if result.migration is not None:
        console.print(migration_line(result.migration))


def virtio_line(name: str, stats: dict) -> str:
    """One virtio device's work: requests, bytes each way, notifications by path, interrupts."""
    queues, transport = stats["queues"], stats["transport"]
    kicks = sum(queue["notifications"] for queue in queues)
    userspace = transport["mmio_notifications"]
    requests = ", ".join(f"{count} {op}" for op, count in stats["device"].items()
                         if count and op in ("reads", "writes", "flushes", "discards", "requests"))
    return (f"virtio {name} ({stats['kind']}): {sum(queue['chains'] for queue in queues)} chains"
            f"{f' ({requests})' if requests else ''}, "
            f"{sum(queue['bytes_written'] for queue in queues) / 1e6:.1f} MB to the guest, "
            f"{sum(queue['bytes_read'] for queue in queues) / 1e6:.1f} MB from it; "
            f"notifications {kicks - userspace} in-kernel, {userspace} userspace; "
            f"{transport['interrupts']} interrupts")


def migration_line(report: dict) -> str:
    """One line for either end of a migration: where, downtime, time, rounds and pages per round."""
    where = f"to {report['to']}" if report["role"] == "source" else f"from {report['from']}"
    seconds = report.get("total_seconds", report.get("receive_seconds"))
    pages = ", ".join(str(count) for count in report["pages_per_round"]) or "none"
    downtime = report.get("downtime_ms")
    return (f"migration {where} ({report['memory']} RAM): downtime "
            f"{'-' if downtime is None else f'{downtime:.1f}'} ms, {seconds:.2f} s in all, "
            f"{report['rounds']} rounds, pages per round: {pages}")


def report_dict(result) -> dict:
    """Everything the summary shows, as plain data (the --report JSON)."""
    return {
        "report_version": REPORT_VERSION,
        "mpvmm_version": __version__,
        "config": dataclasses.asdict(result.config),
        "exit_code": result.exit_code,
        "status": result.status,
        "seconds": result.seconds,
        "latency_bucket_bounds_seconds": list(LATENCY_BOUNDS_SECONDS) + ["+Inf"],
        "vcpus": [
            {
                "index": v.index,
                **dict(zip(("outcome", "outcome_value"), report_fields(v.outcome))),
                "exits": v.exits,
                "paths": v.paths,
                "runs": v.runs,
                "interrupted": v.interrupted,
                "sync_latency_buckets": v.sync_latency_buckets,
                "sync_latency_sum_seconds": v.sync_latency_sum_seconds,
                "sleep_seconds": v.sleep_seconds,
                "posted_stalls": v.posted_stalls,
                "server_wakeups": v.server_wakeups,
                "reply_sleeps": v.reply_sleeps,
                "guest": None if v.guest is None else dataclasses.asdict(v.guest),
                "pid": v.pid,
                "cpu_seconds": v.cpu_seconds,
            }
            for v in result.vcpus
        ],
        "atomic_total": result.atomic_total,
        "device_model": result.device_model,
        "fault_registers": {str(k): v for k, v in result.fault_registers.items()},
        "not_collected": result.not_collected,
        "output_errors": result.output_errors,
        "migration": result.migration,
        "virtio": result.virtio,
    }


def write_report(result, path: str) -> None:
    """The report as JSON, replacing ``path`` whole (output.write_atomically)."""
    write_atomically(path, (json.dumps(report_dict(result), indent=2) + "\n").encode())


def console_error(result) -> str | None:
    """What the guest console lost, if it lost anything, as the status line says it."""
    guest_console = result.device_model.get("console", {})
    if not guest_console.get("lost_bytes"):
        return None
    where = result.config.console or "stdout"
    return f"{guest_console['lost_bytes']} bytes of guest console output not written to {where} ({guest_console['error']})"


def with_output_errors(result, errors: list[str]):
    """``result`` with ``errors`` (output that could not be written) added to its status.

    A run that was otherwise clean then exits 1: its output is incomplete,
    and a script must not take it for a complete one. A run that already
    failed, or was stopped by a signal, keeps its exit code.
    """
    if not errors:
        return result
    return dataclasses.replace(result, exit_code=result.exit_code or 1,
                               status="; ".join([result.status, *errors]),
                               output_errors=[*result.output_errors, *errors])
