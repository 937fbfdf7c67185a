"""What the test initramfs's init reported (``mpvmm-init:`` lines), and a nested boot to it."""

from __future__ import annotations

from tests.linux.initramfs import MARKER

# One nested boot (mpvmm in L1 under TCG): measured 40-100 s on the 2-core
# development VM; the bound leaves room for a loaded CI machine.
NESTED_BOOT_BOUND = 480.0


def init_report(console: str) -> dict[str, list[str]]:
    """init's ``mpvmm-init: key=value`` and ``mpvmm-init: key value`` lines, by key."""
    lines: dict[str, list[str]] = {}
    for line in console.splitlines():
        if line.startswith(MARKER):
            key, _, value = line[len(MARKER):].strip().partition(" ")
            key, _, inline = key.partition("=")
            lines.setdefault(key, []).append(inline or value)
    return lines


def irq_count(report: dict[str, list[str]], device: str, pin: int) -> int:
    """Interrupts on every CPU for ``device`` on IOAPIC pin ``pin``, from /proc/interrupts."""
    for line in report.get("irq", []):
        if line.endswith(f" {device}") and f"IO-APIC   {pin}-edge" in line:
            counts = line.split(":", 1)[1].split()[:-3]  # the last three: chip, pin-trigger, name
            return sum(int(count) for count in counts)
    raise AssertionError(f"no IO-APIC {pin}-edge line for {device} in {report.get('irq')}")


def print_phases(name: str, result) -> None:
    """The boot phases, printed for the record (pytest -s or -rP shows them)."""
    phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in result.phases.items())
    retried = " (booted again in a fresh L1: QEMU's SVM failed the first)" if result.retried else ""
    print(f"\n{name}: {phases}, end {result.seconds:.1f} s{retried}")


# How each ending of the test init reads in mpvmm's status line (all exit 0).
STATUS_LINES = {"poweroff": "guest powered off", "reboot": "guest rebooted", "panic": "guest rebooted"}


def boot_to_init(nested_linux, kernel: str, images: dict[str, str], ending: str, cpus: int, name: str, **options):
    """Boot ``images[ending]`` nested; check the ending and that Linux and init saw every CPU.

    Returns the ``L2Result`` and init's report for the test's own checks.
    """
    result = nested_linux.boot(kernel, images[ending], cpus, bound=NESTED_BOOT_BOUND, **options)
    print_phases(name, result)
    assert result.status == 0 and STATUS_LINES[ending] in result.stderr, result.describe()
    report = init_report(result.console)
    assert any(f"smp: Brought up 1 node, {cpus} CPU" in line for line in report.get("dmesg", [])), result.describe()
    online = "0" if cpus == 1 else f"0-{cpus - 1}"
    assert report.get("cpus") == [str(cpus)] and report.get("online") == [online], result.describe()
    return result, report
