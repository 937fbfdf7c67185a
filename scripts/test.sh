#!/usr/bin/env bash
# Installs what the tests need (scripts/install.sh) and runs them on real KVM.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -c /dev/kvm ]; then
    echo "test.sh: /dev/kvm is missing: the tests run real VMs and cannot run here" >&2
    exit 1
fi
bash scripts/install.sh
# What only the tests use, from Debian's packages: QEMU runs the L1 of the
# nested-KVM Linux tests (tests/nested, docs/linux.md), iasl (acpica-tools)
# disassembles our ACPI tables. Debian's kernels and busybox are downloaded
# into a cache, not installed, by scripts/fetch-test-kernel.sh.
need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v iasl >/dev/null || need_apt+=(acpica-tools)
# mke2fs, debugfs and e2fsck: the nested virtio test's ext4 images.
PATH=$PATH:/sbin:/usr/sbin command -v debugfs >/dev/null || need_apt+=(e2fsprogs)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "test.sh: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
bash scripts/fetch-test-kernel.sh >/dev/null
exec .venv/bin/python -m pytest "$@"
