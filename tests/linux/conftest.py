"""A busybox initramfs for the boot tests (Debian 12's cloud kernel is tests/conftest.py's)."""

import os

import pytest

from tests.linux.initramfs import write_initramfs


@pytest.fixture(scope="session")
def busybox_initramfs(test_cache):
    return write_initramfs(os.path.join(test_cache, "x-busybox", "bin", "busybox"),
                           os.path.join(test_cache, "initramfs.cpio.gz"))
