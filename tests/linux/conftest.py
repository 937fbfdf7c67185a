"""Debian 12's kernels, busybox initramfs images, and an L1 for the nested boots.

The kernels and busybox come from ``test_cache`` (tests/conftest.py). The
nested tests (``nested_kvm`` marker) get one L1 per test module from the
``nested_linux`` fixture: see docs/linux.md for why one per module.
"""

import glob
import os
import shutil

import pytest

from tests.linux.initramfs import init_script, write_initramfs
from tests.nested.l1 import L1, Assets
from tests.nested.l2 import NestedLinux


@pytest.fixture(scope="session")
def debian_kernel(test_cache):
    (kernel,) = glob.glob(os.path.join(test_cache, "x-kernel", "boot", "vmlinuz-*"))
    return kernel


@pytest.fixture(scope="session")
def busybox_initramfs(test_cache):
    return write_initramfs(os.path.join(test_cache, "x-busybox", "bin", "busybox"),
                           os.path.join(test_cache, "initramfs.cpio.gz"))


@pytest.fixture(scope="session")
def generic_kernel(test_cache):
    """Debian's generic kernel: XZ payload, with an MP-table parser."""
    (kernel,) = glob.glob(os.path.join(test_cache, "x-generic", "boot", "vmlinuz-*"))
    return kernel


@pytest.fixture(scope="session")
def init_images(test_cache, tmp_path_factory):
    """A busybox initramfs per way for init to end: ``init_images["reboot"]`` is its path."""
    folder = tmp_path_factory.mktemp("initramfs")
    busybox = os.path.join(test_cache, "x-busybox", "bin", "busybox")
    return {ending: write_initramfs(busybox, str(folder / f"{ending}.cpio.gz"), init_script(ending))
            for ending in ("poweroff", "reboot", "panic", "shell")}


@pytest.fixture(scope="module")
def nested_linux(test_cache, tmp_path_factory):
    """One L1 (QEMU TCG with emulated SVM) for the whole test module, powered off after it."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: install Debian's qemu-system-x86 (scripts/test.sh does)")
    l1 = L1(Assets.from_cache(test_cache), str(tmp_path_factory.mktemp("l1")))
    try:
        yield NestedLinux(l1)
    finally:
        l1.close()
