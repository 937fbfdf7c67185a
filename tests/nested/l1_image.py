"""The L1's initramfs: busybox, the kvm-amd and 9p modules, and an init that serves commands.

Its /init reports each layer on the console as a ``nested-l1:`` line, so
the host can tell which one hung or failed: ``init`` (the L1 kernel booted),
``module PATH`` before each insmod, ``modules loaded`` (and /dev/kvm is
there), ``ready`` (the shares are mounted and the agent listens). A failure
is ``nested-l1: FAILED <layer>: <what>`` and a power-off.

Then it mounts the host's root read-only over 9p at /host, mounts what a
Linux userspace expects over it (proc, sys, devtmpfs, tmpfs on /dev/shm,
mqueue, devpts, tmpfs on /run; TMPDIR is /run/tmp, while /tmp stays the
host's, read-only, so a test's input files there are seen), mounts the
writable results share at the same path it has on the host
(``NESTED_SHARE``, passed on the kernel command line, which hands unknown
``NAME=value`` words to init's environment), and runs the agent: each ``cmd/N.sh`` the host drops into the
share is run with ``chroot /host``, one at a time, stdout/stderr/status going
to ``run/N.out``, ``run/N.err``, ``run/N.rc``. A heartbeat file shows the
host that L1's userspace still runs.
"""

from __future__ import annotations

import os
import stat

from tests.linux.initramfs import build_cpio

MODULE_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "l1-modules.txt")
MARKER = "nested-l1:"
# What a command sees: a clean environment, Python without bytecode writes
# (the root is read-only) and output unbuffered (it reaches the share as it goes).
COMMAND_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "
               "LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TMPDIR=/run/tmp")

NINEP = "trans=virtio,version=9p2000.L,msize=512000"
INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
say() {{ echo "{MARKER} $*"; }}
fail() {{ say "FAILED $1: $2"; sync; poweroff -f; sleep 60; }}
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev \\
    || fail init "cannot mount proc, sys or dev"
say init
for module in $(grep -v '^#' /modules.list); do
    say "module $module"
    insmod "/modules/$module" || fail modules "insmod $module failed"
done
[ -c /dev/kvm ] || fail modules "no /dev/kvm after loading kvm-amd (is SVM emulated?)"
say "modules loaded"
ip link set lo up || fail mounts "cannot bring up lo"
[ -n "$NESTED_SHARE" ] || fail mounts "no NESTED_SHARE on the kernel command line"
mkdir -p /host /share
mount -t 9p -o {NINEP},ro,cache=loose hostroot /host || fail mounts "cannot mount the host root"
mount -t 9p -o {NINEP} results /share || fail mounts "cannot mount the results share"
for spec in proc:proc:/proc sysfs:sysfs:/sys devtmpfs:devtmpfs:/dev tmpfs:shm:/dev/shm \\
            mqueue:mqueue:/dev/mqueue devpts:devpts:/dev/pts tmpfs:run:/run; do
    set -- $(echo "$spec" | tr : ' ')
    mkdir -p "/host$3" 2>/dev/null
    mount -t "$1" "$2" "/host$3" || fail mounts "cannot mount $1 on $3"
done
mkdir -p /host/run/tmp
mount --bind /share "/host$NESTED_SHARE" || fail mounts "cannot mount the share at $NESTED_SHARE"
mkdir -p /share/cmd /share/run
(while :; do cat /proc/uptime > /share/heartbeat.tmp && mv /share/heartbeat.tmp /share/heartbeat; sleep 1; done) &
say ready
cd /
while :; do
    for command in /share/cmd/*.sh; do
        [ -e "$command" ] || continue
        name=${{command##*/}}
        name=${{name%.sh}}
        mv "$command" "/share/run/$name.sh"
        chroot /host /usr/bin/env -i {COMMAND_ENV} /bin/sh "$NESTED_SHARE/run/$name.sh" \\
            </dev/null >"/share/run/$name.out" 2>"/share/run/$name.err"
        echo $? >"/share/run/$name.rc.tmp"
        mv "/share/run/$name.rc.tmp" "/share/run/$name.rc"
    done
    if [ -e /share/poweroff ]; then
        say "powering off"
        sync
        poweroff -f
    fi
    sleep 0.2
done
"""


def module_paths() -> list[str]:
    """The modules to load, in order, relative to the kernel's module folder."""
    with open(MODULE_LIST) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def build_l1_initramfs(busybox_path: str, module_root: str, modules: list[str] | None = None) -> bytes:
    """An uncompressed newc archive (L1 unpacks it faster than a gzip one under TCG).

    ``modules``: what to load, in order (default: l1-modules.txt).
    """
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    directory = stat.S_IFDIR | 0o755
    files = {name: (directory, b"") for name in ("bin", "dev", "proc", "sys", "modules")}
    files["bin/busybox"] = (stat.S_IFREG | 0o755, busybox)
    files["init"] = (stat.S_IFREG | 0o755, INIT_SCRIPT.encode())
    modules = module_paths() if modules is None else modules
    files["modules.list"] = (stat.S_IFREG | 0o644, "\n".join(modules).encode() + b"\n")
    for module in modules:
        parts = module.split("/")
        for depth in range(1, len(parts)):
            files["modules/" + "/".join(parts[:depth])] = (directory, b"")
        with open(os.path.join(module_root, module), "rb") as f:
            files["modules/" + module] = (stat.S_IFREG | 0o644, f.read())
    return build_cpio(files)
