"""A tiny initramfs from Debian's busybox-static, written as a newc cpio in Python.

Its /init mounts /proc, /sys and /dev, reports what the kernel found (``mpvmm-init:``
lines: the CPU count, the PNP devices and their resources, the interrupt
counts of the serial port, the i8042 and the RTC after an RTC alarm, the
RTC's time, the keyboard port, and from dmesg the kernel's lines about the
CPUs and the MP table, so that a boot with ``quiet`` can be checked too) and then ends as the test asks: ``poweroff``, ``reboot``,
``panic`` (a sysrq crash; with ``panic=-1`` the kernel reboots at once) or
``shell`` (a busybox shell reads the console, without the tty's own echo,
so a typed command shows only through what it prints, and a line typed to
``cat`` comes back exactly once, from a guest process). Every line
is userspace output on the console, so it reaches the test only if the
UART's interrupt works.
"""

from __future__ import annotations

import gzip
import os
import stat

CPIO_MAGIC = b"070701"  # newc
TRAILER = "TRAILER!!!"
MARKER = "mpvmm-init:"
SHELL_PROMPT = f"{MARKER} type a line"

KERNEL_LINES = "smp: Brought up|MPTABLE: OEM ID|MultiProcessor Specification"
REPORT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
tx() {{ sed -n 's/^0:.* tx:\\([0-9]*\\).*/\\1/p' /proc/tty/driver/serial; }}
start=$(tx)
{{
echo "{MARKER} cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "{MARKER} online=$(cat /sys/devices/system/cpu/online)"
for device in /sys/bus/pnp/devices/*; do
    [ -e "$device/id" ] && echo "{MARKER} pnp $(cat "$device/id") $(grep -v state "$device/resources" | tr '\\n' ' ')"
done
# An RTC alarm two seconds ahead (one may pass while the slow CMOS reads set it): its
# interrupt shows in /proc/interrupts. ACPI boots only: without ACPI rtc_cmos cannot wake.
echo +2 > /sys/class/rtc/rtc0/wakealarm 2>/dev/null && sleep 4
grep -E 'ttyS0|i8042|rtc0' /proc/interrupts | while read -r line; do echo "{MARKER} irq $line"; done
echo "{MARKER} rtc $(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null)"
echo "{MARKER} serio $(cat /sys/bus/serio/devices/serio0/description 2>/dev/null)"
# The kernel lines the tests check, also when "quiet" kept them off the console.
dmesg | grep -E "{KERNEL_LINES}" | while read -r line; do echo "{MARKER} dmesg $line"; done
}} | tee /report
"""
# echo returns once its bytes are in the tty buffer, and a power-off or reboot
# would cut what is still there. So the report is also kept in a file, and init
# waits until the UART's transmit count has grown by its size since the report
# began (each newline leaves as CR LF: the console's ONLCR), bounded at 60 s.
# A half-second lull in the count is no proof: under load on a 2-core host the
# guest's UART can stall that long.
DRAIN = """size=$(( $(wc -c < /report) + $(wc -l < /report) ))
tries=0
while [ $(( $(tx) - start )) -lt $size ] && [ $tries -lt 120 ]; do sleep 0.5; tries=$((tries + 1)); done
"""
ENDINGS = {
    "poweroff": DRAIN + "poweroff -f\n",
    "reboot": DRAIN + "reboot -f\n",
    "panic": f"echo \"{MARKER} panicking\"\n{DRAIN}echo c > /proc/sysrq-trigger\n",
    "shell": f"stty -echo\necho \"{SHELL_PROMPT}\"\nexec sh\n",
}
INIT_SCRIPT = REPORT + ENDINGS["poweroff"]


def init_script(ending: str) -> str:
    return REPORT + ENDINGS[ending]


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


def write_initramfs(busybox_path: str, output: str, init: str = INIT_SCRIPT) -> str:
    data = busybox_initramfs(busybox_path, init)
    tmp = output + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, output)
    return output
