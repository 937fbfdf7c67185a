"""Linux's own virtio drivers against mpvmm's device processes, in one nested boot.

The cloud kernel loads virtio_mmio (which finds the DSDT's LNRO0005
windows), virtio_blk, virtio_console and virtio-rng from the initramfs and
mounts its root filesystem from ``--disk``: an ext4 image made here with
``mke2fs -d``. Its init mounts a second, read-only disk, reads
``/dev/hwrng``, runs a line typed on the terminal through a shell on
``hvc0``, writes a file, syncs and powers off; the file is then read back
from the image on the host with ``debugfs``. One boot covers all of it: a
nested boot is the expensive part of the suite.
"""

import os
import re

import pytest

from tests.linux.guest_report import NESTED_BOOT_BOUND, init_report, print_phases
from tests.linux.virtio_root import (HVC_PROMPT, READONLY_TEXT, WRITTEN, check_clean, initramfs, read_back,
                                     readonly_image, root_image)

pytestmark = pytest.mark.nested_kvm

CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"


@pytest.fixture
def disks(nested_linux, test_cache):
    """The initramfs and both disk images, in the share L1 can write to (its view of / is read-only)."""
    folder = os.path.join(nested_linux.l1.share, "virtio")
    os.makedirs(folder, exist_ok=True)
    busybox = os.path.join(test_cache, "x-busybox", "bin", "busybox")
    (modules,) = [os.path.join(test_cache, "x-kernel", "lib", "modules", name, "kernel")
                  for name in os.listdir(os.path.join(test_cache, "x-kernel", "lib", "modules"))]
    return {"initrd": initramfs(busybox, modules, os.path.join(folder, "initrd.cpio.gz")),
            "root": root_image(busybox, folder, os.path.join(folder, "root.ext4")),
            "readonly": readonly_image(folder, os.path.join(folder, "readonly.ext4"))}


def test_linux_boots_from_a_virtio_disk_and_uses_every_virtio_device(nested_linux, debian_kernel, disks):
    readonly_before = open(disks["readonly"], "rb").read()
    typed = "echo shell-says-$((6 * 7)); echo typed-$((6 * 7)) > /typed.txt"
    result = nested_linux.boot(
        debian_kernel, disks["initrd"], 1, cmdline=CMDLINE, bound=NESTED_BOOT_BOUND,
        extra_args=["--disk", disks["root"], "--disk", disks["readonly"] + ",readonly",
                    "--console-device", "virtio", "--rng"],
        terminal_steps=[(HVC_PROMPT, typed + "\r")])
    print_phases("cloud kernel, root on virtio-blk, 1 vCPU", result)
    assert result.status == 0 and "guest powered off" in result.stderr, result.describe()
    assert result.steps_left == [], result.describe()
    report = init_report(result.console)
    assert report.get("root", [""])[0].startswith("/dev/root / ext4 rw") or \
        report.get("root", [""])[0].startswith("/dev/vda / ext4 rw"), result.describe()
    assert report.get("vdb-ro") == ["1"], result.describe()  # VIRTIO_BLK_F_RO reached the block layer
    assert report.get("readonly") == [READONLY_TEXT], result.describe()
    assert report.get("readonly-write") == ["refused"], result.describe()
    assert report.get("rng") == ["virtio_rng.0"], result.describe()
    (random,) = report.get("hwrng", [""])
    assert re.fullmatch(r"[0-9a-f]{64}", random) and random != "0" * 64, result.describe()
    # The typed line ran in the guest's shell: its output came back through hvc0, once.
    after_prompt = result.console.split(HVC_PROMPT, 1)[1]
    assert after_prompt.count("shell-says-42") == 1, result.describe()
    # Every virtio device interrupted (irqfd, through the IOAPIC pins the DSDT names).
    irqs = [line for line in report.get("irq", []) if "virtio" in line]
    assert len(irqs) >= 3, result.describe()
    for line in irqs:
        assert sum(int(count) for count in line.split(":", 1)[1].split()[:-3]) > 0, line
    # What init wrote reached the file on the host, and the filesystem is clean.
    assert read_back(disks["root"], WRITTEN) == f"hwrng {random}\nreadonly {READONLY_TEXT}\n"
    assert read_back(disks["root"], "/typed.txt") == "typed-42\n"
    clean = check_clean(disks["root"])
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert open(disks["readonly"], "rb").read() == readonly_before  # mounted read-only: not a byte changed
