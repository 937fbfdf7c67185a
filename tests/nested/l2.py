"""Booting a kernel with mpvmm inside an L1: the host side of ``l2_run``.

``NestedLinux(l1).boot(kernel, initrd, cpus=2, ...)`` writes a request into
the shared folder, runs ``python -m tests.nested.l2_run`` in L1 from this
checkout's virtual environment, and returns an ``L2Result``. An mpvmm run
that outlives its bound raises ``LayerError("L2", ...)``; the L1 command
around it has the bound plus ``STARTUP_MARGIN`` (Python's first imports over
9p take seconds), so a hang inside L2 is reported as L2's, not as the
command's.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from tests.nested.l1 import L1, REPO, STUCK_CPU_LAYER, LayerError

STARTUP_MARGIN = 120.0
TRIPLE_FAULT = "guest reset by a triple fault"
# Boot phases: the first line of each, as the kernel and our init print it.
PHASES = {
    "banner": "Linux version",
    "all_cpus_up": "smp: Brought up",
    "init": "mpvmm-init:",
}


@dataclass(frozen=True)
class Ctl:
    """A terminal step that runs ``mpvmm ctl`` commands (``NestedLinux.ctl``) instead of typing."""

    commands: list[list[str]]


@dataclass
class L2Result:
    status: int
    stderr: str
    console: str
    stdout: str  # the console too, unless it went to a file
    seconds: float
    phases: dict[str, float]
    metrics: str | None = None
    scrape_error: str | None = None
    terminal_restored: bool | None = None
    steps_left: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # seconds into the run at which each step was taken
    ctl: list[dict] = field(default_factory=list)  # each ctl command run: argv, status, stdout, stderr, seconds
    retried: list[str] = field(default_factory=list)  # an earlier boot's triple fault, described
    outcome: dict = field(default_factory=dict)  # l2_run's whole result (with what ``extra_request`` added)

    def describe(self) -> str:
        """For assertion messages: the status, stderr and the console's end."""
        return (f"exit status {self.status}, {self.seconds:.0f} s, phases {self.phases}, "
                f"steps at {self.step_times}, ctl {self.ctl}\n"
                f"--- stderr ---\n{self.stderr[-2000:]}\n--- console, last 4000 characters ---\n"
                f"{self.console[-4000:]}")


class NestedLinux:
    """Boots kernels in ``l1``; after ``vms_per_l1`` VMs the next boot gets a fresh L1.

    One VM per L1 by default: boots that follow other VMs in the same L1 end
    in a triple fault more often (see ``boot``), and a fresh L1 costs about
    15 s (its boot and Python's first imports over 9p).
    """

    def __init__(self, l1: L1, python: str | None = None, vms_per_l1: int = 1):
        self.l1 = l1
        self.python = python or os.path.join(REPO, ".venv", "bin", "python")
        if not os.path.exists(self.python):
            self.python = sys.executable
        self.vms_per_l1 = vms_per_l1
        self._boots = 0
        self._vms_in_l1 = 0  # VMs booted in the L1 now running
        self._counted_l1 = None  # its QEMU process

    def boot(self, kernel: str, initrd: str, cpus: int, **options) -> L2Result:
        """``mpvmm start --kernel ...`` in L1 (``boot_once``'s options); a triple fault is tried once more.

        QEMU's emulated SVM sometimes resets an L2 by a triple fault mid-boot,
        at a different point each time. Measured on the 2-core development VM:
        mpvmm, 1 of 22 boots in a fresh L1 and 3 of 9 that followed other VMs
        in the same L1; QEMU/KVM itself in L1 as the control, 0 of 8 fresh and
        1 of 5 in the same L1 (4 vCPUs). So a triple fault gets one more boot
        in a fresh L1, said on stderr and kept in ``L2Result.retried``; two in
        a row fail the test. An L1 CPU stuck in the emulation (``a_cpu_is_stuck``)
        is retried the same way.
        """
        try:
            result = self.boot_once(kernel, initrd, cpus, **options)
        except LayerError as err:
            if err.layer != STUCK_CPU_LAYER:
                raise
            why, first = err.message, err.message
        else:
            if not (result.status == 1 and TRIPLE_FAULT in result.stderr):
                return result
            why = f"L2 reset by a triple fault after {result.seconds:.0f} s (phases {result.phases})"
            first = result.describe()
        print(f"nested KVM: {why}; booting once more in a fresh L1", file=sys.stderr)
        self.l1.close()  # a stuck L1 is already gone: then this has nothing to do
        retried = self.boot_once(kernel, initrd, cpus, **options)
        retried.retried = [first]
        return retried

    def boot_once(self, kernel: str, initrd: str, cpus: int, *, memory: str = "512M", cmdline: str,
                  extra_args: list[str] = (), **options) -> L2Result:
        """``mpvmm start --kernel ...`` in L1 (``run``'s options); a fresh L1 after ``vms_per_l1`` VMs."""
        if self.l1.running and self.l1.process is self._counted_l1 and self._vms_in_l1 >= self.vms_per_l1:
            self.l1.close()  # l1.run starts a fresh one
        return self.run(["--kernel", kernel, "--initrd", initrd, "--cpus", str(cpus), "--memory", memory,
                         "--cmdline", cmdline, *extra_args], cpus=cpus, **options)

    def restore(self, snapshot: str, cpus: int, extra_args: list[str] = (), **options) -> L2Result:
        """``mpvmm start --restore SNAPSHOT`` in the L1 running now, where the snapshot (in its tmpfs) is.

        A restore is not a boot: it does not count towards a fresh L1.
        """
        if not self.l1.running:
            raise LayerError("L1", f"the L1 that holds {snapshot} is gone")
        return self.run(["--restore", snapshot, *extra_args], cpus=cpus, **options)

    def ctl(self, socket: str, *commands: list[str]) -> Ctl:
        """A terminal step's action: ``mpvmm ctl --api-socket SOCKET`` with each command in turn."""
        return Ctl([[self.python, "-m", "mpvmm", "ctl", "--api-socket", socket, *command] for command in commands])

    def run(self, start_args: list[str], *, cpus: int, console_file: bool = False, bound: float = 300.0,
            metrics_port: int | None = None, terminal_steps: list[tuple[str, str | Ctl]] | None = None,
            extra_request: dict | None = None) -> L2Result:
        """``mpvmm start START_ARGS`` in L1; the console goes to a file (``--console``), else to stdout.

        ``terminal_steps``: run on a pseudo-terminal and, once the console shows
        each step's cue, type its text or run its ``Ctl`` commands.
        ``metrics_port``: serve /metrics there and scrape it once every CPU is
        up, until every vCPU shows exits.
        ``extra_request``: more entries for l2_run's request (``fault``: l2_fault).
        """
        self._boots += 1
        stem = os.path.join(self.l1.share, f"l2-{self._boots:02d}")
        console = f"{stem}-console.log" if console_file else None
        argv = [self.python, "-m", "mpvmm", "start", *start_args]
        argv += ["--console", console] if console else []
        argv += ["--metrics-port", str(metrics_port)] if metrics_port is not None else ["--no-metrics"]
        request = {"argv": argv, "bound": bound, "console": console, "console_copy": f"{stem}-stdout.log",
                   "phases": PHASES, "result": f"{stem}-result.json"}
        if metrics_port is not None:
            request["metrics"] = {"port": metrics_port, "after": PHASES["all_cpus_up"], "cpus": cpus}
        if terminal_steps is not None:
            request["pty"] = {"steps": [{"wait": cue, "ctl": action.commands} if isinstance(action, Ctl)
                                        else {"wait": cue, "send": action} for cue, action in terminal_steps]}
        request.update(extra_request or {})
        with open(f"{stem}-request.json", "w") as f:
            json.dump(request, f)
        try:
            command = self.l1.run(f"{self.python} -m tests.nested.l2_run {stem}-request.json",
                                  timeout=bound + STARTUP_MARGIN)
        finally:
            if self.l1.process is not self._counted_l1:
                self._counted_l1, self._vms_in_l1 = self.l1.process, 0
            self._vms_in_l1 += 1
        if command.status != 0 or not os.path.exists(request["result"]):
            raise LayerError("command", f"l2_run exited with status {command.status}",
                             f"--- stdout ---\n{command.stdout[-2000:]}\n--- stderr ---\n{command.stderr[-3000:]}")
        with open(request["result"]) as f:
            outcome = json.load(f)
        text = _read(console or request["console_copy"])
        if outcome["timed_out"]:
            raise LayerError("L2", f"mpvmm did not end within {bound:.0f} s (phases seen: {outcome['phases']})",
                             f"--- stderr ---\n{outcome['stderr'][-2000:]}\n--- L2 console, last lines ---\n"
                             + "\n".join(text.splitlines()[-30:]) + "\n" + describe_hang(outcome.get("hang")))
        return L2Result(outcome["status"], outcome["stderr"], text, _read(request["console_copy"]),
                        outcome["seconds"], outcome["phases"],
                        outcome["metrics"], outcome["scrape_error"], outcome.get("terminal_restored"),
                        outcome["steps_left"], outcome["step_times"], outcome["ctl"], outcome=outcome)


def describe_hang(hang: dict | None) -> str:
    """l2_run's two samples of a run past its bound, as lines: each thread's state, wait channel and
    CPU ticks in between, and how L1's KVM counters moved."""
    if not hang:
        return ""
    first, second = hang["first"], hang["second"]
    lines = [f"--- at the bound ({hang['sample_seconds']} s apart; then {hang['ended_by']}) ---"]
    for thread, now in sorted(second["threads"].items()):
        state, wchan, ticks = now.split()
        before = first["threads"].get(thread, now).split()[2]
        lines.append(f"{thread}: {state} {wchan}, +{int(ticks) - int(before)} ticks")
    moved = {name: value - first["kvm"].get(name, value) for name, value in second["kvm"].items()}
    lines.append(f"L1 KVM counters moved: {moved}")
    return "\n".join(lines)


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
