"""The ``mpvmm`` command. Errors become one line on stderr and an exit code here."""

import argparse
import sys

from rich.console import Console

from mpvmm import __version__
from mpvmm.api.server import (DEFAULT_DOWNTIME_MS, DEFAULT_MIGRATION_TIMEOUT_S, DOWNTIME_MS_RANGE,
                              MAX_BANDWIDTH_MIB_S_RANGE, MIGRATION_TIMEOUT_S_RANGE)
from mpvmm.arguments import RUN_SECONDS_MAX, TOP_INTERVAL_MAX, check_writable, parse_number, parse_size
from mpvmm.bench.command import add_bench_command
from mpvmm.errors import MpvmmError, UsageError
from mpvmm.guest.abi import WORKLOADS
from mpvmm.migration.address import parse as parse_address
from mpvmm.metrics import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_PORT, DEFAULT_METRICS_URL
from mpvmm.output import GuardedStream, open_standard_fds, say
from mpvmm.stop_signals import StopSignals
from mpvmm.transport import DEFAULT_TRANSPORT, TRANSPORTS
from mpvmm.x86.linux import DEFAULT_CMDLINE


DEFAULT_MEMORY = "256M"
DEFAULT_WORKLOAD = "demo"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpvmm", description="A KVM virtual machine monitor built for many vCPUs.")
    parser.add_argument("--version", action="version", version=f"mpvmm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    start = commands.add_parser("start", help="run a VM with the built-in guest")
    # The machine's options default to None so that --restore and --incoming,
    # whose VM brings its own machine, can tell that one was given.
    start.add_argument("--cpus", type=int, default=None, help="number of vCPUs (default 1)")
    start.add_argument("--memory", type=parse_size, default=None, help="guest RAM (default 256M)")
    start.add_argument("--workload", default=None, choices=WORKLOADS, metavar="NAME",
                       help=f"built-in guest workload: {', '.join(WORKLOADS)} (default demo)")
    start.add_argument("--dirty-rate", type=int, default=None, metavar="MIB",
                       help="MiB/s the dirty workload writes, over all vCPUs (default 16)")
    start.add_argument("--seconds", type=parse_number(0, RUN_SECONDS_MAX), default=None,
                       help="stop after this many seconds, at most a year (default: until Ctrl-C or the guest exits)")
    start.add_argument("--runner", default="native", choices=("native", "python", "process"),
                       help="vCPU workers: native C threads without the GIL (default), Python "
                            "threads (the GIL baseline), or one process per vCPU, each with a VM of its own")
    start.add_argument("--transport", default=DEFAULT_TRANSPORT, choices=TRANSPORTS,
                       help="how exits reach the device model: shared-memory rings or POSIX message "
                            f"queues (default {DEFAULT_TRANSPORT})")
    start.add_argument("--console", metavar="FILE", help="write guest console output to FILE")
    start.add_argument("--report", metavar="FILE", help="write the summary as JSON to FILE")
    start.add_argument("--metrics-addr", default=DEFAULT_METRICS_ADDR, metavar="ADDR",
                       help=f"address to serve Prometheus /metrics on (default {DEFAULT_METRICS_ADDR})")
    start.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, metavar="PORT",
                       help=f"port to serve /metrics on (default {DEFAULT_METRICS_PORT}; 0: any free port)")
    start.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    start.add_argument("--kernel", metavar="PATH",
                       help="boot this Linux kernel (bzImage or vmlinux) instead of the built-in guest")
    start.add_argument("--initrd", metavar="PATH", help="initial ramdisk for --kernel")
    start.add_argument("--cmdline", metavar="STR", help=f"kernel command line (default: {DEFAULT_CMDLINE})")
    start.add_argument("--api-socket", metavar="PATH",
                       help="serve the control API (HTTP, JSON) on this Unix socket: see `mpvmm ctl`")
    start.add_argument("--restore", metavar="DIR", help="carry on the VM saved in this snapshot directory")
    start.add_argument("--incoming", metavar="URL",
                       help="wait for a VM migrating in at tcp:HOST:PORT or unix:PATH, then run it")
    start.set_defaults(func=cmd_start)
    ctl = commands.add_parser("ctl", help="control a VM started with --api-socket")
    ctl.add_argument("--api-socket", required=True, metavar="PATH", help="the VM's API socket")
    actions = ctl.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (("status", "the VM's state and counts, as JSON"), ("pause", "pause every vCPU"),
                         ("resume", "resume a paused VM"), ("stop", "end the run, as --seconds would")):
        actions.add_parser(action, help=text)
    actions.add_parser("snapshot", help="save the paused VM to a new directory").add_argument("target", metavar="DIR")
    migrate = actions.add_parser("migrate", help="move the running VM to a VMM started with --incoming URL")
    migrate.add_argument("target", metavar="URL", help="tcp:HOST:PORT or unix:PATH")
    migrate.add_argument("--downtime-ms", type=parse_number(*DOWNTIME_MS_RANGE, unit="milliseconds"),
                         default=DEFAULT_DOWNTIME_MS, metavar="MS",
                         help=f"how long the VM may be paused (default {DEFAULT_DOWNTIME_MS})")
    migrate.add_argument("--timeout", type=parse_number(*MIGRATION_TIMEOUT_S_RANGE), default=DEFAULT_MIGRATION_TIMEOUT_S,
                         metavar="SECONDS",
                         help=f"give up and run on here after this long (default {DEFAULT_MIGRATION_TIMEOUT_S:g})")
    migrate.add_argument("--max-bandwidth", type=parse_number(*MAX_BANDWIDTH_MIB_S_RANGE, unit="MiB/s"), default=None,
                         metavar="MIB",
                         help="send pages at most this many MiB/s (default: as fast as the link goes)")
    ctl.set_defaults(func=cmd_ctl)
    top = commands.add_parser("top", help="live per-vCPU exit rates of a running VM, like kvm_stat")
    top.add_argument("--url", default=DEFAULT_METRICS_URL,
                     help=f"the VM's metrics endpoint (default {DEFAULT_METRICS_URL})")
    top.add_argument("--once", action="store_true",
                     help="scrape twice a second apart, print one table and exit (for scripts)")
    top.add_argument("--interval", type=parse_number(0, TOP_INTERVAL_MAX, low_allowed=False), default=1.0,
                     metavar="SECONDS", help="refresh period, at most a day (default 1)")
    top.set_defaults(func=cmd_top)
    add_bench_command(commands)
    return parser


# Options that describe the machine: a restored or arriving VM brings its own.
MACHINE_OPTIONS = ("cpus", "memory", "workload", "dirty_rate", "kernel", "initrd", "cmdline")


def check_machine_options(args) -> None:
    """--restore and --incoming take the machine from the VM they bring back; refuse one given too."""
    if args.restore is not None and args.incoming is not None:
        raise UsageError("--restore and --incoming each bring a VM: give one of them")
    bringer = "--restore" if args.restore is not None else "--incoming" if args.incoming is not None else None
    given = [f"--{name.replace('_', '-')}" for name in MACHINE_OPTIONS if getattr(args, name) is not None]
    if bringer and given:
        raise UsageError(f"{bringer} brings the VM's own machine; {', '.join(given)} cannot be given with it")


def cmd_start(args, stop_signals: StopSignals | None = None) -> int:
    # Imported here so that `mpvmm --help` works without the native extension.
    from mpvmm.supervisor.run import RunConfig, Supervisor
    from mpvmm.supervisor.terminal import stdin_terminal

    check_machine_options(args)
    if args.incoming is not None:
        parse_address(args.incoming)  # a bad address is exit 2 before anything else
    config = RunConfig(cpus=1 if args.cpus is None else args.cpus,
                       memory=parse_size(DEFAULT_MEMORY) if args.memory is None else args.memory,
                       workload=args.workload or DEFAULT_WORKLOAD, dirty_rate=args.dirty_rate,
                       seconds=args.seconds, runner=args.runner, transport=args.transport, console=args.console,
                       metrics_addr=args.metrics_addr,
                       metrics_port=None if args.no_metrics else args.metrics_port,
                       kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                       restore=args.restore, incoming=args.incoming, api_socket=args.api_socket)
    # One StopSignals to the end: a Ctrl-C stops the VM cleanly, one more
    # cannot cut the summary or the report short, and none can land between
    # creating the report check's probe file and removing it.
    with stop_signals or StopSignals() as signals:
        if args.report:
            check_writable(args.report, "--report", replaced=True)
        if signals.received is not None:
            return 128 + signals.received  # stopped while mpvmm loaded: nothing created
        result = _summarise(Supervisor(config, stdin_fd=stdin_terminal()).run(signals), args.report)
    say(f"mpvmm: {result.status}; exit code {result.exit_code}")
    for index, registers in result.fault_registers.items():
        say(f"mpvmm: vcpu {index} registers: " + " ".join(f"{name}={value:#x}" for name, value in registers.items()))
    return result.exit_code


def _summarise(result, report: str | None):
    """The summary on stdout, then the report; ``result`` with what could not be written added."""
    from mpvmm.supervisor.summary import console_error, render_summary, with_output_errors, write_report

    stdout = GuardedStream(1)
    # Wide enough for every column even when stdout is a pipe or a file.
    render_summary(result, Console(file=stdout, width=max(Console(file=stdout).width, 132)))
    errors = [error for error in (console_error(result),) if error]
    if stdout.error is not None:
        errors.append(f"summary not written to stdout ({stdout.error.strerror})")
    result = with_output_errors(result, errors)
    if report:
        try:
            write_report(result, report)
        except OSError as err:
            result = with_output_errors(result, [f"report not written to {report} ({err.strerror})"])
    return result


def cmd_ctl(args) -> int:
    from mpvmm.api.client import run_ctl

    return run_ctl(args)


def cmd_top(args) -> int:
    from mpvmm.metrics.top import run_top

    return run_top(args.url, once=args.once, interval=args.interval)


def main(argv: list[str] | None = None, stop_signals: StopSignals | None = None) -> int:
    """The mpvmm command. ``stop_signals``: installed by the program from its first line
    (``mpvmm.__main__``); ``start`` keeps it for its run, the other subcommands get the
    usual KeyboardInterrupt back. A stop signal before a subcommand starts is exit 128+N."""
    try:
        open_standard_fds()
        args = build_parser().parse_args(argv)
        if stop_signals is not None:
            if args.func is not cmd_start:
                stop_signals.restore()
            if stop_signals.received is not None:
                return 128 + stop_signals.received  # nothing has been created yet
        return cmd_start(args, stop_signals) if args.func is cmd_start else args.func(args)
    except MpvmmError as err:
        say(f"mpvmm: error: {err}")
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
