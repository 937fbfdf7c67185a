"""The disk files the virtio-blk bench reads: made once per bench, in the page cache, removed after.

Each holds the disk pattern the guest checks its reads against
(``abi.disk_pattern``). Just written, they sit in the page cache, so a
window measures the device path, not the host's storage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from mpvmm.guest import abi

DISK_BYTES = 64 << 20
CHUNK_BYTES = 4 << 20


@contextlib.contextmanager
def bench_disks(count: int, size: int = DISK_BYTES) -> Iterator[list[str]]:
    """``count`` disk files of ``size`` bytes in a private folder, removed with it on the way out."""
    folder = tempfile.mkdtemp(prefix=f"mpvmm-bench-{os.getpid()}-")
    try:
        paths = [os.path.join(folder, f"disk{index}.img") for index in range(count)]
        for path in paths:
            with open(path, "wb") as f:
                for offset in range(0, size, CHUNK_BYTES):
                    f.write(abi.disk_pattern(offset, min(CHUNK_BYTES, size - offset)))
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)
