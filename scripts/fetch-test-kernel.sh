#!/usr/bin/env bash
# Downloads Debian 12's cloud kernel and busybox-static into a cache folder
# for the Linux boot tests (tests/linux/), without installing either:
# `apt-get download` then `dpkg-deb -x`. Prints the cache folder.
# Usage: scripts/fetch-test-kernel.sh [CACHE_DIR]   (default ~/.cache/mpvmm-test)
set -euo pipefail
cache=${1:-${MPVMM_TEST_CACHE:-$HOME/.cache/mpvmm-test}}
mkdir -p "$cache"
cd "$cache"
if ! ls x-kernel/boot/vmlinuz-* >/dev/null 2>&1 || [ ! -x x-busybox/bin/busybox ]; then
    # The metapackage names the current ABI's image package.
    image=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$image" ]; then
        apt-get update -qq
        image=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    rm -f ./*.deb
    # _apt cannot write here when run as root in a private folder; that is fine.
    apt-get download -q "$image" busybox-static >/dev/null 2>&1 || apt-get download "$image" busybox-static
    rm -rf x-kernel x-busybox
    dpkg-deb -x linux-image-*.deb x-kernel
    dpkg-deb -x busybox-static_*.deb x-busybox
    rm -f ./*.deb
fi
echo "$cache"
