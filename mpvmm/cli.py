"""The ``mpvmm`` command. Errors become one line on stderr and an exit code here."""

import argparse
import sys

from rich.console import Console

from mpvmm import __version__
from mpvmm.arguments import check_writable, parse_size
from mpvmm.bench.command import add_bench_command
from mpvmm.errors import MpvmmError
from mpvmm.guest.abi import WORKLOADS
from mpvmm.metrics import DEFAULT_METRICS_ADDR, DEFAULT_METRICS_PORT, DEFAULT_METRICS_URL
from mpvmm.transport import DEFAULT_TRANSPORT, TRANSPORTS
from mpvmm.x86.linux import DEFAULT_CMDLINE


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage in one line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mpvmm", description="A KVM virtual machine monitor built for many vCPUs.")
    parser.add_argument("--version", action="version", version=f"mpvmm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    start = commands.add_parser("start", help="run a VM with the built-in guest")
    start.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    start.add_argument("--memory", type=parse_size, default="256M", help="guest RAM (default 256M)")
    start.add_argument("--workload", default="demo", choices=WORKLOADS, metavar="NAME",
                       help=f"built-in guest workload: {', '.join(WORKLOADS)} (default demo)")
    start.add_argument("--seconds", type=float, default=None,
                       help="stop after this many seconds (default: until Ctrl-C or the guest exits)")
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
    start.set_defaults(func=cmd_start)
    top = commands.add_parser("top", help="live per-vCPU exit rates of a running VM, like kvm_stat")
    top.add_argument("--url", default=DEFAULT_METRICS_URL,
                     help=f"the VM's metrics endpoint (default {DEFAULT_METRICS_URL})")
    top.add_argument("--once", action="store_true",
                     help="scrape twice a second apart, print one table and exit (for scripts)")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                     help="refresh period (default 1)")
    top.set_defaults(func=cmd_top)
    add_bench_command(commands)
    return parser


def cmd_start(args) -> int:
    # Imported here so that `mpvmm --help` works without the native extension.
    from mpvmm.supervisor.run import RunConfig, Supervisor
    from mpvmm.supervisor.summary import render_summary, write_report
    from mpvmm.supervisor.terminal import stdin_terminal

    config = RunConfig(cpus=args.cpus, memory=args.memory, workload=args.workload,
                       seconds=args.seconds, runner=args.runner, transport=args.transport, console=args.console,
                       metrics_addr=args.metrics_addr,
                       metrics_port=None if args.no_metrics else args.metrics_port,
                       kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline)
    if args.report:
        check_writable(args.report, "--report")
    result = Supervisor(config, stdin_fd=stdin_terminal()).run()
    # Wide enough for every column even when stdout is a pipe or a file.
    console = Console(width=max(Console().width, 132))
    render_summary(result, console)
    if args.report:
        write_report(result, args.report)
    print(f"mpvmm: {result.status}; exit code {result.exit_code}", file=sys.stderr)
    for index, registers in result.fault_registers.items():
        print(f"mpvmm: vcpu {index} registers: " +
              " ".join(f"{name}={value:#x}" for name, value in registers.items()), file=sys.stderr)
    return result.exit_code


def cmd_top(args) -> int:
    from mpvmm.metrics.top import run_top

    return run_top(args.url, once=args.once, interval=args.interval)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MpvmmError as err:
        print(f"mpvmm: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
