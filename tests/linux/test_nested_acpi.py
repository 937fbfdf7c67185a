"""Debian's cloud kernel (LZ4, ACPI only) booted to init by mpvmm inside an L1 (nested KVM).

One L1 serves the module (``nested_linux``). Every check of userspace output
is also a check of interrupt routing: init's writes to the console need the
UART's IRQ 4, which Linux maps only because the DSDT describes COM1. The
phase times printed here are the ones docs/linux.md records.
"""

import re
import time

import pytest

from tests.linux.guest_report import NESTED_BOOT_BOUND, boot_to_init, irq_count
from tests.linux.initramfs import SHELL_PROMPT

pytestmark = pytest.mark.nested_kvm

CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off"
METRICS_PORT = 9477  # inside L1, which has a network stack of its own


def test_two_vcpus_boot_to_init_which_finds_every_device_and_powers_off(
        nested_linux, debian_kernel, init_images):
    result, report = boot_to_init(nested_linux, debian_kernel, init_images, "poweroff", 2,
                                  "cloud kernel, 2 vCPUs, power-off", cmdline=CMDLINE, metrics_port=METRICS_PORT)
    pnp = " | ".join(report.get("pnp", []))
    assert re.search(r"PNP0501 io 0x3f8-0x3ff irq \d+", pnp), pnp  # COM1 through 8250_pnp
    assert re.search(r"PNP0303 io 0x60-0x60 io 0x64-0x64 irq \d+", pnp), pnp  # the i8042's keyboard port
    assert re.search(r"PNP0b00 io 0x70-0x71 irq \d+", pnp) and "PNP0c02 io 0x600-0x603" in pnp, pnp
    assert irq_count(report, "ttyS0", 4) > 0  # init's own output raised them
    assert irq_count(report, "i8042", 1) > 0  # the probe's answers
    assert report.get("serio") == ["i8042 KBD port"], result.describe()
    assert abs(int(report["rtc"][0]) - time.time()) < NESTED_BOOT_BOUND  # rtc_cmos read the host's clock
    assert irq_count(report, "rtc0", 8) > 0  # the alarm init set one second ahead
    assert "rtc_cmos 00:02: registered as rtc0" in result.console
    assert "rtc_cmos 00:02: alarms up to one day" in result.console
    assert "system 00:03: [io  0x0600-0x0603] has been reserved" in result.console
    for failure in ("probe of i8042 failed", "probe of rtc_cmos failed", "Keylock active"):
        assert failure not in result.console
    # Scraped while the guest ran: every vCPU made exits the VMM counted.
    assert result.metrics is not None, result.scrape_error
    for vcpu in range(2):
        exits = sum(float(line.rsplit(" ", 1)[1]) for line in result.metrics.splitlines()
                    if line.startswith("mpvmm_vcpu_exits_total{") and f'vcpu="{vcpu}"' in line)
        assert exits > 0, f"vcpu {vcpu} shows no exits"
    assert 'workload="linux"' in result.metrics


def test_four_vcpus_with_the_console_in_a_file_reboot(nested_linux, debian_kernel, init_images):
    # quiet: every byte of the kernel's log is an exit, and 4 vCPUs on L1's 2 are slow enough.
    result, _ = boot_to_init(nested_linux, debian_kernel, init_images, "reboot", 4,
                             "cloud kernel, 4 vCPUs, reboot", cmdline=CMDLINE + " quiet", console_file=True)
    assert "mpvmm-init: cpus=4" not in result.stdout  # the console went to the file, not to stdout
    assert "4 vCPUs" in result.stdout  # where the summary went


def test_a_typed_line_reaches_a_guest_shell_and_ctrl_c_stops_the_vm(nested_linux, debian_kernel, init_images):
    """mpvmm on a pseudo-terminal: keys go to the guest's UART, Ctrl-C stops the VM."""
    started, line = "cat-is-running", "typed on the host, echoed by cat in the guest"
    steps = [(SHELL_PROMPT, f"echo {started}; cat\r"),  # a command for the guest's shell
             (started, line + "\r"),  # a line for cat
             (line, "\x03")]  # Ctrl-C, for mpvmm
    # quiet: the kernel's log is not what this test is about, and every byte of it is an exit.
    result = nested_linux.boot(debian_kernel, init_images["shell"], 1, cmdline=CMDLINE + " quiet",
                               bound=NESTED_BOOT_BOUND, terminal_steps=steps)
    assert result.steps_left == [], result.describe()
    assert result.status == 130 and "stopped by SIGINT" in result.stderr, result.describe()
    after_prompt = result.console.split(SHELL_PROMPT, 1)[1]
    assert after_prompt.count(started) == 1  # the shell ran the typed command (no tty echoes it)
    assert after_prompt.split(started, 1)[1].count(line) == 1  # cat's output alone
    assert result.terminal_restored
