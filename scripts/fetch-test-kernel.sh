#!/usr/bin/env bash
# Downloads what the Linux boot tests (tests/linux/, tests/nested/) boot, into
# a cache folder, without installing any of it: `apt-get download` then
# `dpkg-deb -x`. Prints the cache folder.
#   x-kernel/   Debian 12's cloud kernel (LZ4, ACPI only)
#   x-generic/  Debian 12's generic kernel (XZ, has an MP-table parser) and,
#               of its modules, only those tests/nested/l1-modules.txt lists
#               (the nested-KVM harness's L1 loads them)
#   x-busybox/  busybox-static, for the initramfs images
# Usage: scripts/fetch-test-kernel.sh [CACHE_DIR]   (default ~/.cache/mpvmm-test)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${MPVMM_TEST_CACHE:-$HOME/.cache/mpvmm-test}}
mkdir -p "$cache"
cd "$cache"

# The package a metapackage depends on (the current ABI's image).
image_of() {
    local image
    image=$(apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$image" ]; then
        apt-get update -qq
        image=$(apt-cache depends "$1" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [ -n "$image" ] || { echo "fetch-test-kernel.sh: no package behind $1" >&2; exit 1; }
    echo "$image"
}

# Downloads package $1 and extracts it into folder $2 (replacing it).
extract() {
    local work
    work=$(mktemp -d "$cache/.fetch.XXXXXX")
    # _apt cannot write into a private folder when run as root; that is fine.
    (cd "$work" && { apt-get download -q "$1" >/dev/null 2>&1 || apt-get download "$1"; })
    rm -rf "$2"
    dpkg-deb -x "$work"/*.deb "$work/x"
    mv "$work/x" "$2"
    rm -rf "$work"
}

if ! ls x-kernel/boot/vmlinuz-* >/dev/null 2>&1; then
    extract "$(image_of linux-image-cloud-amd64)" x-kernel
fi
if [ ! -x x-busybox/bin/busybox ]; then
    extract busybox-static x-busybox
fi
if ! ls x-generic/boot/vmlinuz-* >/dev/null 2>&1; then
    extract "$(image_of linux-image-amd64)" x-generic.tmp
    # Keep the kernel and the L1's modules: the package's other 300 MiB is
    # modules no test loads.
    kernel_dir=$(echo x-generic.tmp/lib/modules/*/kernel)
    keep=$(mktemp -d "$cache/.keep.XXXXXX")
    grep -v '^#' "$root/tests/nested/l1-modules.txt" | while read -r module; do
        [ -n "$module" ] || continue
        mkdir -p "$keep/$(dirname "$module")"
        mv "$kernel_dir/$module" "$keep/$module"
    done
    rm -rf "$kernel_dir"
    mv "$keep" "$kernel_dir"
    rm -rf x-generic.tmp/usr
    mv x-generic.tmp x-generic
fi
echo "$cache"
