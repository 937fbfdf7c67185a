"""Debian 12's cloud kernel and a busybox initramfs for the boot tests.

``scripts/fetch-test-kernel.sh`` downloads both into a cache folder once
(``$MPVMM_TEST_CACHE``, default ~/.cache/mpvmm-test); like the KVM tests,
these fail rather than skip when they cannot get them.
"""

import glob
import os
import subprocess

import pytest

from tests.linux.initramfs import write_initramfs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def test_cache():
    cache = os.environ.get("MPVMM_TEST_CACHE", os.path.expanduser("~/.cache/mpvmm-test"))
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "fetch-test-kernel.sh"), cache],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"cannot fetch Debian's kernel for the boot tests: {result.stderr.strip()[-500:]}")
    return cache


@pytest.fixture(scope="session")
def debian_kernel(test_cache):
    (kernel,) = glob.glob(os.path.join(test_cache, "x-kernel", "boot", "vmlinuz-*"))
    return kernel


@pytest.fixture(scope="session")
def busybox_initramfs(test_cache):
    return write_initramfs(os.path.join(test_cache, "x-busybox", "bin", "busybox"),
                           os.path.join(test_cache, "initramfs.cpio.gz"))
