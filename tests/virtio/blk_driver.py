"""A guest's virtio_blk driver for the tests: one request at a time, laid out as the test asks."""

import struct

from mpvmm.virtio import block
from mpvmm.virtio.block import Block
from tests.virtio.driver import Driver


class BlockGuest:
    """Probes a ``Block`` device and submits requests on its queues."""

    def __init__(self, device: Block, refuse: int = 0, memory=None, buffer=None):
        self.driver = Driver(device, memory=memory, buffer=buffer)
        self.queues = self.driver.probe(refuse=refuse)
        self.device = device

    def _high(self, item):
        """The same buffer placed above the MMIO hole: bytes are copied there, lengths allocated there."""
        memory, high = self.driver.memory, self.driver.high_data
        if isinstance(item, int):
            return (high.take(max(item, 1), 8), item)
        address = high.take(max(len(item), 1), 8)
        memory.write(address, bytes(item))
        return (address, len(item))

    def request(self, kind, sector=0, out_data=(), in_lengths=(), queue=0, split_header=False, indirect=False,
                high=False):  # fmt: skip
        """Submit one request; returns (status, the data the device wrote, used length)."""
        header = struct.pack("<IIQ", kind, 0, sector)
        out = [header[:4], header[4:]] if split_header else [header]
        out_data, in_lengths = list(out_data), list(in_lengths)
        if high:
            out_data = [self._high(item) for item in out_data]
            in_lengths = [self._high(length) for length in in_lengths]
        q = self.queues[queue]
        head, writable = q.add(out=out + out_data, in_=in_lengths + [1], indirect=indirect)
        q.kick()
        used = q.take_used()
        assert [h for h, _ in used] == [head], "the request did not complete"
        memory = self.driver.memory
        status = memory.read(writable[-1][0], 1)[0]
        data = b"".join(memory.read(a, n) for a, n in writable[:-1])
        return status, data, used[0][1]

    def read(self, sector, length, pieces=1, **kwargs):
        return self.request(block.T_IN, sector, in_lengths=[length // pieces] * pieces, **kwargs)

    def write(self, sector, data, pieces=1, **kwargs):
        size = len(data) // pieces
        parts = [data[i * size : (i + 1) * size if i < pieces - 1 else len(data)] for i in range(pieces)]
        return self.request(block.T_OUT, sector, out_data=parts, **kwargs)[0]

    def ranges(self, kind, segments):
        payload = b"".join(struct.pack("<QII", *segment) for segment in segments)
        return self.request(kind, out_data=[payload])[0]
