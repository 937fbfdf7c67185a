"""A Linux guest snapshotted after it booted, restored in a new mpvmm process, and still answering (nested KVM).

mpvmm boots Debian's cloud kernel on 2 vCPUs inside an L1 with a shell on
the console (a pseudo-terminal). The shell answers a first line; then
``mpvmm ctl`` pauses the VM, snapshots it into L1's tmpfs and stops it. A
new ``mpvmm start --restore`` carries on: the line typed to it at once
(before its VM is even built) must reach the same shell, whose answer shows
it is the same process (a variable counts on from its saved value), that
its timers run (``sleep 1``, /proc/uptime advancing, but not by the time
the VM spent saved), that the guest computes (a square of a number it
never saw before) and that the second vCPU runs a process. Then the guest
powers off: exit 0, and nothing of either run is left in L1.
"""

import json
import os
import random
import re

import pytest

from tests.linux.guest_report import NESTED_BOOT_BOUND, print_phases
from tests.linux.initramfs import SHELL_PROMPT

pytestmark = pytest.mark.nested_kvm

CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
CPUS = 2
RESTORE_BOUND = 300.0  # a restore, a second of sleep and a power-off; Python's start-up in L1 is most of it
LEFTOVERS_BOUND = 120.0
TIMER_SLACK = 0.5  # the steps are seen by polling every 0.2 s


def answer(console: str, tag: str) -> dict[str, str]:
    """The ``key=value`` fields of the guest's line with ``tag`` (after the shell's prompt; a line
    typed before mpvmm made the terminal raw was echoed by the host's line discipline: not it)."""
    match = re.search(rf"\b{tag} (n=\d+ .*)$", console, re.MULTILINE)
    assert match, f"no {tag!r} line in:\n{console[-2000:]}"
    return dict(field.split("=", 1) for field in match.group(1).split() if "=" in field)


def test_a_booted_linux_is_snapshotted_restored_in_a_new_vmm_and_still_answers(nested_linux, debian_kernel,
                                                                              init_images):
    work = "/run/tmp"  # L1's tmpfs: the snapshot stays in L1, the restore runs there too
    snapshot, socket = f"{work}/linux-snapshot", f"{work}/linux-vm.sock"
    secret = random.randrange(10_000, 99_999)

    first_steps = [
        (SHELL_PROMPT, 'n=41; echo "before n=$n up=$(cut -d" " -f1 /proc/uptime) =ok-$((n+1))="\r'),
        ("=ok-42=", nested_linux.ctl(socket, ["pause"], ["snapshot", snapshot], ["stop"])),
    ]
    booted = nested_linux.boot(debian_kernel, init_images["shell"], CPUS, cmdline=CMDLINE, bound=NESTED_BOOT_BOUND,
                               extra_args=["--api-socket", socket], terminal_steps=first_steps)
    print_phases("cloud kernel, 2 vCPUs, booted to a shell and snapshotted", booted)
    assert [ctl["status"] for ctl in booted.ctl] == [0, 0, 0], booted.describe()
    assert booted.steps_left == [], booted.describe()
    assert booted.status == 0 and "stopped through the API" in booted.stderr, booted.describe()
    saved = json.loads(booted.ctl[1]["stdout"])
    before = answer(booted.console, "before")

    restored_steps = [
        ("", f'n=$((n+1)); sleep 1; echo "after n=$n up=$(cut -d" " -f1 /proc/uptime) sq=$(({secret}*{secret})) '
             f'cpu=$(taskset 2 cut -d" " -f39 /proc/self/stat) =ok-$((n*1000))="\r'),  # typed at once
        ("=ok-42000=", "poweroff -f\r"),
    ]
    report = os.path.join(nested_linux.l1.share, "restored-report.json")  # the share: seen here too
    restored = nested_linux.restore(snapshot, CPUS, bound=RESTORE_BOUND, extra_args=["--report", report],
                                    terminal_steps=restored_steps)
    print(f"restored: answered {restored.step_times[1]:.1f} s after mpvmm started, powered off at "
          f"{restored.seconds:.1f} s; the boot's run: pause {booted.ctl[0]['seconds']:.1f} s, snapshot "
          f"{booted.ctl[1]['seconds']:.1f} s ({saved}), stop {booted.ctl[2]['seconds']:.1f} s")
    assert restored.steps_left == [], restored.describe()
    assert restored.status == 0 and "guest powered off" in restored.stderr, restored.describe()
    assert restored.terminal_restored
    after = answer(restored.console, "after")
    assert before["n"] == "41" and after["n"] == "42"  # the same shell, its variable carried on
    assert after["sq"] == str(secret * secret)
    assert after["cpu"] == "1"  # a process ran on the second vCPU
    # The guest's clock runs (sleep 1), but not while the VM is saved: from its first answer it
    # counts at most the rest of the first run (its clock read at the snapshot, after the pause)
    # and the restored run from its resume (the report's seconds), not the restore's start-up.
    with open(report) as f:
        restored_seconds = json.load(f)["seconds"]
    guest_seconds = float(after["up"]) - float(before["up"])
    ran_seconds = (booted.seconds - booted.step_times[1]) + restored_seconds
    assert 1.0 <= guest_seconds <= ran_seconds + TIMER_SLACK, (before, after, ran_seconds)
    print(f"guest uptime advanced {guest_seconds:.2f} s; the restored VM ran {restored_seconds:.2f} s, the "
          f"first run {booted.seconds - booted.step_times[1]:.1f} s after its answer")

    left = nested_linux.l1.run(
        f'echo "ipc:" $(ls -A /dev/shm /dev/mqueue | grep -v ":$"); echo "processes:" $(pgrep -af mpvmm); '
        f'echo "in {work}:" $(ls -A {work}); echo "snapshot:" $(du -k {snapshot}/memory.raw); rm -r {snapshot}',
        timeout=LEFTOVERS_BOUND)
    print(f"in L1 after the runs:\n{left.stdout}")
    assert left.status == 0, left.stderr
    found = dict(line.split(":", 1) for line in left.stdout.splitlines())
    assert found["ipc"].strip() == "" and found["processes"].strip() == "", found
    assert found[f"in {work}"].split() == ["linux-snapshot"], found  # the API socket is gone
