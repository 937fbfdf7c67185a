"""virtio-rng (spec 5.4): random bytes from the host into every buffer the driver offers.

One queue (requestq); each chain's device-writable buffers are filled from
``source(n)`` (``os.urandom`` in a device process) and returned with the
number of bytes written. A request gets at most ``MAX_BYTES_PER_REQUEST``
bytes, as the spec allows ("one or more"), so one huge buffer cannot make
the device draw gigabytes of randomness. A chain without a writable byte is
returned empty; a source failure (OSError) also returns the chain empty,
counted, which Linux's driver simply retries.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable

from mpvmm.virtio import spec
from mpvmm.virtio.device import VirtioDevice

REQUEST_QUEUE = 0
QUEUE_SIZE = 64
MAX_BYTES_PER_REQUEST = 64 * 1024


@dataclass
class EntropyStats:
    """Plain counters; the owner turns them into metrics."""

    requests: int = 0  # chains completed
    bytes: int = 0  # random bytes given to the guest
    empty_requests: int = 0  # chains with no writable byte
    source_errors: int = 0  # source() raised OSError

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Entropy(VirtioDevice):
    """A virtio entropy device fed by ``source(n) -> bytes``."""

    device_id = spec.DEVICE_ID_ENTROPY
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, source: Callable[[int], bytes] = os.urandom):
        self._source = source
        self.stats = EntropyStats()

    def process(self, index: int) -> int:
        queue = self.queues[index]
        completed = 0
        while (chain := queue.pop()) is not None:
            wanted = min(chain.writable_length, MAX_BYTES_PER_REQUEST)
            data = self._draw(wanted) if wanted else b""
            chain.write(self.memory, 0, data)
            queue.push_used(chain.head, len(data))
            self.stats.requests += 1
            self.stats.bytes += len(data)
            self.stats.empty_requests += not data
            completed += 1
        return completed

    def _draw(self, length: int) -> bytes:
        try:
            data = self._source(length)
        except OSError:
            self.stats.source_errors += 1
            return b""
        return bytes(data[:length])
