"""An L1 Linux under QEMU TCG with emulated AMD SVM, giving commands a real /dev/kvm.

``L1.start()`` boots Debian's generic kernel under
``qemu-system-x86_64 -accel tcg,thread=multi -cpu qemu64,+svm,+npt`` with the
initramfs of ``l1_image``, and waits for each layer in turn, each within its
own bound; ``L1.run(command, timeout)`` runs a shell command inside L1, in a
chroot of the host's root (so the same paths, the same virtual environment),
and returns its status and output; ``L1.close()`` powers L1 off and kills
QEMU's process group whatever happened.

Anything that hangs or fails raises ``LayerError`` naming the layer: "QEMU
start" (no L1 kernel output), "L1 boot" (the kernel did not reach init),
"L1 modules" (an insmod failed or hung, or no /dev/kvm), "L1 mounts" (the
shares), "L1" (QEMU died, L1 panicked or stopped answering while a command
ran) or "command" (the command outlived its bound). After a command times
out L1 is discarded, since whatever hung may have hurt it; the next
``run`` boots a fresh one.
"""

from __future__ import annotations

import glob
import os
import shlex
import socket
import sys
import time
import weakref
from dataclasses import dataclass

from tests.nested import l1_image
from tests.nested.process import kill_group, spawn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QEMU = "qemu-system-x86_64"
BANNER = "Linux version"
PANIC = "Kernel panic"
# The L1 kernel's report of a CPU that passed no RCU quiescent state for its stall
# timeout (21 s in Debian's kernels), repeated about every minute while it lasts. Seen
# once at low load: L1's CPU 0 stuck for over 500 s running an L2 under QEMU's emulated
# SVM while its other CPU still answered. A second report means the CPU is stuck, not
# slowed: waiting out the command's bound gains nothing, a fresh L1 may.
RCU_STALL = "detected stalls on CPUs/tasks"
STUCK_CPU_LAYER = "L1 CPU"


def a_cpu_is_stuck(console_text: str) -> bool:
    """Whether ``console_text`` (L1's console since a command began) reports one stall twice."""
    return console_text.count(RCU_STALL) >= 2
POLL_SECONDS = 0.2
TAIL_LINES = 40


class LayerError(AssertionError):
    """A layer of the nested set-up hung or failed; ``layer`` names it."""

    def __init__(self, layer: str, message: str, detail: str = ""):
        self.layer = layer
        self.message = message
        text = f"nested KVM, layer {layer!r}: {message}"
        if detail:
            text += "\n" + detail
        super().__init__(text)


@dataclass(frozen=True)
class Bounds:
    """Seconds each layer may take (TCG on a busy 2-core host is slow: margins are wide)."""

    qemu_start: float = 60.0  # QEMU start to the L1 kernel's banner (measured ~1 s)
    l1_boot: float = 240.0  # banner to L1's init (measured ~7 s idle)
    modules: float = 180.0  # init to every module loaded and /dev/kvm
    mounts: float = 120.0  # to both shares mounted and the agent listening
    stale_heartbeat: float = 90.0  # L1's userspace silent this long while a command runs: L1 is gone
    stop: float = 30.0  # power-off to QEMU's exit, before it is killed


@dataclass(frozen=True)
class Assets:
    """The L1 kernel, the folder its modules are under, and busybox."""

    kernel: str
    module_root: str
    busybox: str

    @classmethod
    def from_cache(cls, cache: str) -> "Assets":
        """What scripts/fetch-test-kernel.sh put in ``cache``."""
        (kernel,) = glob.glob(os.path.join(cache, "x-generic", "boot", "vmlinuz-*"))
        (module_root,) = glob.glob(os.path.join(cache, "x-generic", "lib", "modules", "*", "kernel"))
        return cls(kernel, module_root, os.path.join(cache, "x-busybox", "bin", "busybox"))


@dataclass
class CommandResult:
    status: int
    stdout: str
    stderr: str
    seconds: float


class _Console:
    """L1's serial console (a file QEMU writes), read as it grows."""

    def __init__(self, path: str):
        self.path = path
        self.text = ""

    def read(self) -> str:
        try:
            with open(self.path, "rb") as f:
                self.text = f.read().decode(errors="replace")
        except FileNotFoundError:
            pass
        return self.text

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "--- L1 console, last lines ---\n" + "\n".join(self.read().splitlines()[-lines:])


def _thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """Each thread of ``pid``: tid -> (name, user + system ticks)."""
    ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks[tid] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12]))
    return ticks


class L1:
    def __init__(self, assets: Assets, workdir: str, cpus: int = 2, memory: str = "3G",
                 bounds: Bounds = Bounds(), qemu: str = QEMU, extra_cmdline: str = "",
                 modules: list[str] | None = None):
        if any(ch.isspace() for ch in workdir):
            raise ValueError(f"the L1 work folder must not contain spaces: {workdir!r}")
        self.assets = assets
        self.workdir = workdir
        self.share = os.path.join(workdir, "share")
        os.makedirs(os.path.join(self.share, "cmd"), exist_ok=True)
        self.cpus = cpus
        self.memory = memory
        self.bounds = bounds
        self.qemu = qemu
        self.extra_cmdline = extra_cmdline
        self.modules = modules
        self.start_failure: LayerError | None = None
        self.retried_starts: list[str] = []
        self.process = None
        self.console = _Console(os.path.join(workdir, "l1-console.log"))
        self.boot_seconds: dict[str, float] = {}
        self._commands = 0
        self._finalizer = None

    # --- Start. ---

    def qemu_argv(self, initrd: str) -> list[str]:
        # no_timer_check: under TCG on a loaded host, Linux's early check that the PIT ticks through
        # the IOAPIC can fail and panic L1 ("IO-APIC + timer doesn't work!"; seen here at load 7).
        cmdline = f"console=ttyS0 panic=-1 no_timer_check NESTED_SHARE={self.share} {self.extra_cmdline}".strip()
        return [
            self.qemu, "-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt",
            "-smp", str(self.cpus), "-m", self.memory,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
            "-serial", f"file:{self.console.path}",
            "-kernel", self.assets.kernel, "-initrd", initrd, "-append", cmdline,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={self.share},mount_tag=results,security_model=none",
        ]

    def start(self) -> None:
        initrd = os.path.join(self.workdir, "l1-initramfs.cpio")
        with open(initrd, "wb") as f:
            f.write(l1_image.build_l1_initramfs(self.assets.busybox, self.assets.module_root, self.modules))
        # A previous L1's leftovers: its console, its power-off request, a command it never took.
        stale = [self.console.path, os.path.join(self.share, "poweroff")]
        stale += glob.glob(os.path.join(self.share, "cmd", "*"))
        for path in stale:
            if os.path.exists(path):
                os.unlink(path)
        log = open(os.path.join(self.workdir, "qemu.log"), "wb")
        started = time.monotonic()
        try:
            self.process = spawn(self.qemu_argv(initrd), stdin=open(os.devnull, "rb"), stdout=log, stderr=log)
        except OSError as err:
            raise LayerError("QEMU start", f"cannot run {self.qemu}: {err}") from err
        finally:
            log.close()
        self._finalizer = weakref.finalize(self, kill_group, self.process)
        try:
            self._wait_for_layers(started)
        except BaseException:
            self._discard()  # no agent to ask for a power-off yet
            raise

    def _wait_for_layers(self, started: float) -> None:
        bounds = self.bounds
        layers = (("QEMU start", BANNER, bounds.qemu_start),
                  ("L1 boot", f"{l1_image.MARKER} init", bounds.l1_boot),
                  ("L1 modules", f"{l1_image.MARKER} modules loaded", bounds.modules),
                  ("L1 mounts", f"{l1_image.MARKER} ready", bounds.mounts))
        for layer, marker, bound in layers:
            deadline = time.monotonic() + bound
            while marker not in self.console.read():
                self._check_alive(layer)
                if time.monotonic() > deadline:
                    raise LayerError(layer, f"no {marker!r} on L1's console within {bound:.0f} s"
                                     + self._last_step(), self.console.tail())
                time.sleep(POLL_SECONDS)
            self.boot_seconds[layer] = time.monotonic() - started

    def _last_step(self) -> str:
        steps = [line for line in self.console.text.splitlines() if line.startswith(l1_image.MARKER)]
        return f" (last step: {steps[-1]!r})" if steps else ""

    def _check_alive(self, layer: str) -> None:
        """QEMU still running, L1 not panicked, init not reporting a failure."""
        text = self.console.text
        for line in text.splitlines():
            if line.startswith(f"{l1_image.MARKER} FAILED "):
                failed_layer, _, what = line[len(l1_image.MARKER) + 8 :].partition(": ")
                raise LayerError(f"L1 {failed_layer}", what, self.console.tail())
        if PANIC in text:
            raise LayerError(layer, "the L1 kernel panicked", self.console.tail())
        if self.process.poll() is not None:
            raise LayerError(layer, f"QEMU exited with status {self.process.returncode}: "
                             f"{self._qemu_log()[-1500:]}", self.console.tail())

    def _qemu_log(self) -> str:
        try:
            with open(os.path.join(self.workdir, "qemu.log"), "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    # --- Commands. ---

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def run(self, command: str, timeout: float, cwd: str = REPO) -> CommandResult:
        """Run shell ``command`` in L1 (cwd ``cwd``); the status is the command's own."""
        if not self.running:
            if self.start_failure is not None:  # do not wait through every bound again
                raise LayerError(self.start_failure.layer, f"(an earlier start) {self.start_failure.message}")
            self._start_with_one_retry()
        self._commands += 1
        name = f"{self._commands:04d}"
        script = f"cd {shlex.quote(cwd)} || exit 125\n{command}\n"
        command_dir, run_dir = os.path.join(self.share, "cmd"), os.path.join(self.share, "run")
        tmp = os.path.join(command_dir, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(script)
        os.rename(tmp, os.path.join(command_dir, f"{name}.sh"))  # the agent sees only complete scripts
        started = time.monotonic()
        status_path = os.path.join(run_dir, f"{name}.rc")
        console_start = len(self.console.text)
        while not os.path.exists(status_path):
            self.console.read()
            self._check_alive("L1")
            if a_cpu_is_stuck(self.console.text[console_start:]):
                self._discard()
                raise LayerError(STUCK_CPU_LAYER, f"an L1 CPU is stuck (RCU stalls) while running: {command}",
                                 self._outputs(run_dir, name))
            waited = time.monotonic() - started
            heartbeat_age = self._heartbeat_age()
            if heartbeat_age > self.bounds.stale_heartbeat and waited > self.bounds.stale_heartbeat:
                where = self._where_cpus_are()
                self._discard()
                raise LayerError("L1", f"L1 stopped answering (no heartbeat for {heartbeat_age:.0f} s) "
                                 f"while running: {command}", self._outputs(run_dir, name) + where)
            if waited > timeout:
                self._discard()
                raise LayerError("command", f"did not finish within {timeout:.0f} s (L1's heartbeat "
                                 f"{heartbeat_age:.0f} s old): {command}",
                                 self._outputs(run_dir, name))
            time.sleep(POLL_SECONDS)
        seconds = time.monotonic() - started
        with open(status_path) as f:
            status = int(f.read().strip() or -1)
        return CommandResult(status, self._read(run_dir, f"{name}.out"), self._read(run_dir, f"{name}.err"),
                             seconds)

    def _start_with_one_retry(self) -> None:
        """An L1 that panicked or hung while booting gets one more try (TCG's hiccups pass);
        QEMU failing to start does not, and a second failure is remembered."""
        for attempt in (1, 2):
            try:
                self.start()
                return
            except LayerError as err:
                if attempt == 2 or err.layer == "QEMU start":
                    self.start_failure = err
                    raise
                self.retried_starts.append(str(err))
                print(f"nested KVM: L1 start failed, trying once more: {err.message}", file=sys.stderr)

    def _heartbeat_age(self) -> float:
        try:
            return time.time() - os.stat(os.path.join(self.share, "heartbeat")).st_mtime
        except FileNotFoundError:
            return float("inf")

    @staticmethod
    def _read(folder: str, name: str) -> str:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _outputs(self, run_dir: str, name: str) -> str:
        out, err = self._read(run_dir, f"{name}.out"), self._read(run_dir, f"{name}.err")
        return f"--- stdout so far ---\n{out[-3000:]}\n--- stderr so far ---\n{err[-3000:]}\n{self.console.tail(15)}"

    @property
    def monitor_path(self) -> str:
        return os.path.join(self.workdir, "qemu-monitor.sock")

    def _where_cpus_are(self) -> str:
        """For a silent L1: QEMU's threads' CPU use over a second and each L1 CPU's registers
        (QEMU's monitor: halted or not, RIP, and whether it is in SVM guest mode, i.e. in L2)."""
        lines = ["--- QEMU at the hang ---"]
        try:
            before = _thread_ticks(self.process.pid)
            time.sleep(0.5)
            for thread, (comm, after) in sorted(_thread_ticks(self.process.pid).items()):
                lines.append(f"thread {thread} {comm}: +{after - before.get(thread, (comm, after))[1]} ticks in 0.5 s")
        except OSError as err:
            lines.append(f"QEMU's threads: {err}")
        try:
            with socket.socket(socket.AF_UNIX) as monitor:
                monitor.settimeout(5)
                monitor.connect(self.monitor_path)
                monitor.sendall(b"info registers -a\n")
                reply, deadline = b"", time.monotonic() + 5
                while time.monotonic() < deadline:
                    try:
                        chunk = monitor.recv(65536)
                    except socket.timeout:
                        break
                    if not chunk:
                        break
                    reply += chunk
            keep = ("CPU#", "RIP=", "HLT=", "EFER=", "CR0=")
            lines += [line for line in reply.decode(errors="replace").splitlines()
                      if any(key in line for key in keep)]
        except OSError as err:
            lines.append(f"QEMU's monitor: {err}")
        return "\n".join(lines)

    # --- Stop. ---

    def _discard(self) -> None:
        """Kill QEMU now: L1's state is unknown."""
        if self.process is not None:
            kill_group(self.process, grace=1.0)
        if self._finalizer is not None:
            self._finalizer.detach()

    def close(self) -> None:
        """Power L1 off (the agent polls for it), then kill QEMU's group whatever happened."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                open(os.path.join(self.share, "poweroff"), "w").close()
            except OSError:
                pass
            deadline = time.monotonic() + self.bounds.stop
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        self._discard()
