"""``mpvmm bench``: its options, the interleaved schedule of runs, the output.

Runs are interleaved (raw, native, python, raw, ...; every repeat goes once
through every workload, vCPU count and transport) so that drift of a shared
or throttling host hits every runner alike, and each record is the median of
its repeats. The raw loop has no device model, so it runs once per
combination whatever ``--transport`` lists. Nothing is created before every
option has been checked.
"""

import argparse
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mpvmm.arguments import check_writable, parse_number
from mpvmm.transport import DEFAULT_TRANSPORT, TRANSPORTS

# Workloads with exact, steady exit streams; hostile and faulting ones are no benchmark.
BENCH_WORKLOADS = ("pio-null", "pio-device", "mmio", "uart", "doorbell", "compute", "atomics", "demo")
BENCH_RUNNERS = ("raw", "native", "python", "process")
# A 1-minute load average from this up means something else runs beside the bench.
BUSY_LOAD_AVERAGE = 0.5
PROGRESS_REFRESH_SECONDS = 1.0  # rarely: a refresh takes the GIL the python runner is measured on
# An hour-long window per run is already far past a useful bench (the figures settle in seconds).
WINDOW_SECONDS_MAX = 3600


def _list_of(kind: str, choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        if not items:
            raise argparse.ArgumentTypeError(f"no {kind} given")
        for item in items:
            if item not in choices:
                raise argparse.ArgumentTypeError(f"unknown {kind} {item!r} (choose from {', '.join(choices)})")
        return items
    return parse


def _cpu_list(text: str) -> list[int]:
    try:
        counts = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid vCPU counts {text!r} (example: 1,2,4,8)") from None
    if not counts:
        raise argparse.ArgumentTypeError("no vCPU counts given")
    if counts[0] < 1:
        raise argparse.ArgumentTypeError(f"vCPU counts must be at least 1, not {counts[0]}")
    return counts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid repeat count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def add_bench_command(commands) -> None:
    """Adds ``bench`` to the ``mpvmm`` subcommands."""
    bench = commands.add_parser(
        "bench", help="measure exit throughput per runner and vCPU count against KVM alone",
        description="Runs the built-in guest with each runner at each vCPU count and reports exits "
                    "per second, the ratio to the raw reference loop and the scaling efficiency.")
    bench.add_argument("--cpus", type=_cpu_list, default=[1, 2, 4, 8], metavar="N,N,...",
                       help="vCPU counts (default 1,2,4,8)")
    bench.add_argument("--workload", type=_list_of("workload", BENCH_WORKLOADS), default=["pio-null"],
                       metavar="NAME,...", help=f"workloads: {', '.join(BENCH_WORKLOADS)} (default pio-null)")
    bench.add_argument("--runner", type=_list_of("runner", BENCH_RUNNERS), default=["raw", "native", "python"],
                       metavar="NAME,...", help=f"runners: {', '.join(BENCH_RUNNERS)} (default raw,native,python)")
    bench.add_argument("--transport", type=_list_of("transport", TRANSPORTS), default=[DEFAULT_TRANSPORT],
                       metavar="NAME,...", help=f"transports to the device model: {', '.join(TRANSPORTS)} "
                                                f"(default {DEFAULT_TRANSPORT})")
    bench.add_argument("--seconds", type=parse_number(0, WINDOW_SECONDS_MAX, low_allowed=False), default=2.0,
                       help="length of each measured window, at most an hour (default 2)")
    bench.add_argument("--repeat", type=_positive_int, default=3,
                       help="runs of each combination; the median is reported (default 3)")
    bench.add_argument("--pin", action="store_true",
                       help="pin each vCPU thread to a host CPU of its own (where there are enough)")
    bench.add_argument("--json", metavar="FILE", help="write one record per (workload, runner, cpus) as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="draw exits/s against vCPUs (needs mpvmm[plot])")
    bench.set_defaults(func=cmd_bench)


def _check_host(args) -> None:
    """Every vCPU count must fit KVM and the host for every runner, before any run."""
    from mpvmm.kvm.system import Kvm
    from mpvmm.supervisor.run import RunConfig, validate

    with Kvm() as kvm:
        max_vcpus = kvm.max_vcpus()
    for runner in args.runner:
        # validate() knows the supervisor's runners; raw needs the same VM minus the queues.
        validate(RunConfig(cpus=max(args.cpus), runner="native" if runner == "raw" else runner), max_vcpus)


def cmd_bench(args) -> int:
    from mpvmm.bench import report

    for path, option, replaced in ((args.json, "--json", True), (args.plot, "--plot", False)):
        if path:
            check_writable(path, option, replaced=replaced)
    if args.plot:
        from mpvmm.bench.plot import require_matplotlib

        require_matplotlib()
    _check_host(args)

    host = report.host_info()
    if host["load_average"][0] >= BUSY_LOAD_AVERAGE:
        print(f"mpvmm: warning: host load average is {host['load_average'][0]:.1f}: "
              f"other work on this host will skew the figures", file=sys.stderr)
    schedule = [(repeat, workload, cpus, runner, transport)
                for repeat in range(args.repeat) for workload in args.workload
                for cpus in args.cpus for runner in args.runner
                for transport in ([None] if runner == "raw" else args.transport)]
    samples, exit_code = _run_schedule(schedule, args)
    host["load_average_after"] = list(os.getloadavg())
    records = report.build_records(samples, host)
    report.render_tables(records, Console(width=max(Console().width, 160)))
    if args.json:
        report.write_json(records, args.json)
    if args.plot and records:
        from mpvmm.bench.plot import write_plot

        write_plot(records, args.plot)
    if exit_code:
        print(f"mpvmm: bench interrupted after {len(samples)} of {len(schedule)} runs", file=sys.stderr)
    return exit_code


def _run_schedule(schedule: list[tuple], args) -> tuple[list, int]:
    """Measures each run in turn with a progress display; (samples, exit code).

    A stop signal ends the schedule early with 128 + its number and the
    samples so far; a run that fails otherwise fails the bench.
    """
    from mpvmm.bench import report
    from mpvmm.bench.measure import BenchRunError, measure

    samples, exit_code = [], 0
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True, auto_refresh=False)
    task = progress.add_task("starting", total=len(schedule))
    last_refresh = 0.0

    def on_progress(done: int, fraction: float) -> None:
        nonlocal last_refresh
        progress.update(task, completed=done + fraction)
        if time.monotonic() - last_refresh >= PROGRESS_REFRESH_SECONDS:
            last_refresh = time.monotonic()
            progress.refresh()

    with progress:
        for done, (repeat, workload, cpus, runner, transport) in enumerate(schedule):
            what = f"{workload} {runner}{f'/{transport}' if transport else ''} {cpus} vCPU{'s' if cpus > 1 else ''}"
            progress.update(task, description=f"{what} (repeat {repeat + 1}/{args.repeat})", completed=done)
            progress.refresh()
            try:
                sample = measure(workload, runner, cpus, args.seconds, transport=transport, pin=args.pin,
                                 on_progress=lambda fraction, done=done: on_progress(done, fraction))
            except KeyboardInterrupt:
                exit_code = 130  # 128 + SIGINT, as `mpvmm start`
                break
            except BenchRunError as err:
                if err.exit_code <= 128:
                    raise
                exit_code = err.exit_code  # stopped by a signal: show what was measured so far
                break
            samples.append(sample)
            unit = report.short_unit(report.throughput_unit(workload))
            progress.console.print(f"{what} (repeat {repeat + 1}): {report.sample_throughput(sample):,.0f} {unit}/s")
        progress.update(task, completed=len(samples))
    return samples, exit_code
