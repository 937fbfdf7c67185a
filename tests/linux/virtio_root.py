"""A Linux guest whose root filesystem is a virtio-blk disk: the images the nested test boots.

The cloud kernel has virtio_mmio, virtio_blk, virtio_console and virtio-rng
as modules, so a small initramfs (busybox and those modules) loads them,
mounts ``/dev/vda`` and switches to it. The root filesystem is an ext4 image
made with ``mke2fs -d`` from a folder; its ``/sbin/init`` (``ROOT_INIT``)
reports what it finds on the UART (``mpvmm-init:`` lines), mounts the
read-only second disk, reads ``/dev/hwrng``, runs one line typed on ``hvc0``
through a shell, writes ``/written.txt``, syncs, remounts the root read-only
and powers off. The test then reads the image on the host with ``debugfs``.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess

from tests.linux.initramfs import MARKER, build_cpio

# insmod order: each after what it depends on (the modules' "depends=").
MODULES = {
    "virtio_ring": "drivers/virtio/virtio_ring.ko",
    "virtio": "drivers/virtio/virtio.ko",
    "virtio_mmio": "drivers/virtio/virtio_mmio.ko",
    "virtio_blk": "drivers/block/virtio_blk.ko",
    "virtio_console": "drivers/char/virtio_console.ko",
    "virtio-rng": "drivers/char/hw_random/virtio-rng.ko",
}
HVC_PROMPT = f"{MARKER} type a line on hvc0"
READONLY_TEXT = "on the read-only disk"
WRITTEN = "/written.txt"
DISK_SIZES_MIB = {"root": 24, "readonly": 8}
# Before powering off: the UART's last bytes out (its transmit count standing still for half a second).
DRAIN = """sent=; now=$(cat /proc/tty/driver/serial)
while [ "$sent" != "$now" ]; do sleep 0.5; sent=$now; now=$(cat /proc/tty/driver/serial); done
"""

# Waits up to 10 s for a device node the drivers create as they probe.
WAIT_FOR = """wait_for() {
    i=0; while [ ! -e "$1" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    [ -e "$1" ] || echo "MARK missing $1"
}
""".replace("MARK", MARKER)

INITRAMFS_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
{WAIT_FOR}
for module in {" ".join(MODULES)}; do
    insmod /lib/modules/$module.ko && echo "{MARKER} loaded $module" || echo "{MARKER} insmod $module failed"
done
wait_for /dev/vda
echo "{MARKER} mounting /dev/vda"
# In the background: if it hangs (a lost interrupt, a device stopped), say what the kernel saw.
mount -t ext4 /dev/vda /root &
mounting=$!
i=0; while kill -0 $mounting 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $mounting 2>/dev/null; then
    echo "{MARKER} mount hangs"
    grep -E 'virtio|CPU' /proc/interrupts | while read -r line; do echo "{MARKER} irq $line"; done
    dmesg | tail -40 | while read -r line; do echo "{MARKER} dmesg $line"; done
fi
if ! wait $mounting; then
    echo "{MARKER} no root filesystem"
    dmesg | grep -iE 'virtio|vd[ab]' | while read -r line; do echo "{MARKER} dmesg $line"; done
    {DRAIN}    poweroff -f
fi
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root /sbin/init
"""

# The root filesystem's init. The typed line is run by a shell reading hvc0
# (no echo, so its output shows only what the shell printed); the prompt goes
# to hvc0 alone, so the test's cue comes through the virtio console.
ROOT_INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mkdir /tmp/bin
/bin/busybox --install -s /tmp/bin
export PATH=/tmp/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
{WAIT_FOR}
echo "{MARKER} root $(grep ' / ' /proc/mounts)"
wait_for /dev/vdb
echo "{MARKER} vdb-ro $(cat /sys/block/vdb/ro)"
mount -t ext4 -o ro /dev/vdb /mnt && echo "{MARKER} readonly $(cat /mnt/hello.txt)"
echo "{MARKER} readonly-write $(echo x 2>/dev/null > /mnt/new.txt && echo written || echo refused)"
echo "{MARKER} rng $(cat /sys/class/misc/hw_random/rng_current)"
random=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n')
echo "{MARKER} hwrng $random"
wait_for /dev/hvc0
# One descriptor for the whole exchange: a tty closed by its last user forgets its mode (echo).
exec 3<>/dev/hvc0
stty -echo <&3
echo "{HVC_PROMPT}" >&3
head -n 1 <&3 | sh >&3 2>&3 &
shell=$!
i=0; while kill -0 $shell 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
if kill -0 $shell 2>/dev/null; then
    echo "{MARKER} the hvc0 shell hangs"
    ps | while read -r line; do echo "{MARKER} ps $line"; done
    grep virtio /proc/interrupts | while read -r line; do echo "{MARKER} irq $line"; done
    dmesg | tail -20 | while read -r line; do echo "{MARKER} dmesg $line"; done
fi
exec 3>&-
echo "hwrng $random" > {WRITTEN}
echo "readonly $(cat /mnt/hello.txt)" >> {WRITTEN}
sync
mount -o remount,ro /
grep virtio /proc/interrupts | while read -r line; do echo "{MARKER} irq $line"; done
{DRAIN}poweroff -f
"""


def initramfs(busybox_path: str, modules_dir: str, output: str) -> str:
    """The initramfs that loads the virtio modules from ``modules_dir`` and switches to /dev/vda."""
    files = {name: (stat.S_IFDIR | 0o755, b"") for name in ("bin", "dev", "proc", "sys", "root", "lib",
                                                             "lib/modules")}
    files["bin/busybox"] = (stat.S_IFREG | 0o755, _read(busybox_path))
    files["init"] = (stat.S_IFREG | 0o755, INITRAMFS_INIT.encode())
    for name, path in MODULES.items():
        files[f"lib/modules/{name}.ko"] = (stat.S_IFREG | 0o644, _read(os.path.join(modules_dir, path)))
    with open(output, "wb") as f:
        f.write(gzip.compress(build_cpio(files), compresslevel=6, mtime=0))
    return output


def root_image(busybox_path: str, folder: str, output: str) -> str:
    """An ext4 image holding busybox and ``ROOT_INIT`` at /sbin/init."""
    tree = os.path.join(folder, "root-tree")
    for name in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt"):
        os.makedirs(os.path.join(tree, name))
    _write(os.path.join(tree, "bin", "busybox"), _read(busybox_path), 0o755)
    _write(os.path.join(tree, "sbin", "init"), ROOT_INIT.encode(), 0o755)
    return make_ext4(tree, output, DISK_SIZES_MIB["root"])


def readonly_image(folder: str, output: str) -> str:
    tree = os.path.join(folder, "readonly-tree")
    os.makedirs(tree)
    _write(os.path.join(tree, "hello.txt"), READONLY_TEXT.encode() + b"\n", 0o644)
    return make_ext4(tree, output, DISK_SIZES_MIB["readonly"])


def make_ext4(tree: str, output: str, mib: int) -> str:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, output, f"{mib}M"],
                   check=True, capture_output=True, timeout=60)
    return output


def read_back(image: str, path: str) -> str:
    """A file of an ext4 image, read on the host by ``debugfs`` (the image is not mounted)."""
    result = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def check_clean(image: str) -> subprocess.CompletedProcess:
    """``e2fsck -fn``: exit 0 when the filesystem is consistent and needs no journal replay."""
    return subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True, timeout=60)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes, mode: int) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
