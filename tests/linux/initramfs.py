"""A tiny initramfs from Debian's busybox-static, written as a newc cpio in Python.

Its /init mounts /proc, prints the CPU count the kernel brought up and
powers the machine off, so a test can read the count from the console and
see the run end with "guest powered off".
"""

from __future__ import annotations

import gzip
import os
import stat

CPIO_MAGIC = b"070701"  # newc
TRAILER = "TRAILER!!!"

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
echo "mpvmm-init: cpus=$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
echo "mpvmm-init: online=$(/bin/busybox cat /sys/devices/system/cpu/online 2>/dev/null)"
/bin/busybox poweroff -f
"""


def _entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
    header = CPIO_MAGIC + b"".join(f"{field:08X}".encode() for field in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_cpio(files: dict[str, tuple[int, bytes]]) -> bytes:
    """``{path: (mode, data)}`` (directories with S_IFDIR and no data) -> newc archive."""
    out = bytearray()
    for ino, (name, (mode, data)) in enumerate(sorted(files.items()), start=1):
        out += _entry(name, mode, data, ino)
    out += _entry(TRAILER, 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def busybox_initramfs(busybox_path: str, init: str = INIT_SCRIPT) -> bytes:
    """A gzip-compressed initramfs with busybox at /bin/busybox and ``init`` at /init."""
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    files = {
        "bin": (stat.S_IFDIR | 0o755, b""),
        "dev": (stat.S_IFDIR | 0o755, b""),
        "proc": (stat.S_IFDIR | 0o755, b""),
        "sys": (stat.S_IFDIR | 0o755, b""),
        "bin/busybox": (stat.S_IFREG | 0o755, busybox),
        "init": (stat.S_IFREG | 0o755, init.encode()),
    }
    return gzip.compress(build_cpio(files), compresslevel=6, mtime=0)


def write_initramfs(busybox_path: str, output: str) -> str:
    data = busybox_initramfs(busybox_path)
    tmp = output + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, output)
    return output
