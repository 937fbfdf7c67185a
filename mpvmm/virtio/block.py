"""virtio-blk (spec 5.2) over a host file: read, write, flush, get-id, discard and write-zeroes.

A request is one chain: a 16-byte header the device reads (type, reserved,
sector), the data (device-readable for writes, device-writable for reads),
and a status byte, the last device-writable byte. The layout of the
descriptors is the driver's business (headers may be split, data may sit in
any number of buffers), so the device works on byte offsets into the chain.

Rules a request can break are answered with a status, as the protocol wants:
``VIRTIO_BLK_S_IOERR`` for an I/O error, a range past the capacity, a length
that is not whole sectors, data on the wrong side, a write to a read-only
disk, a short header; ``VIRTIO_BLK_S_UNSUPP`` for an unknown type, a type whose
feature was not negotiated, or unknown discard flags. Only a chain with no
device-writable byte at all has nowhere for a status: that is a broken driver
and the device needs a reset. The status byte is written after the data, so a
driver that sees it sees the data too.

Offered: SEG_MAX, FLUSH, RO (read-only disks), DISCARD (writable disks whose
file can punch holes), WRITE_ZEROES (writable disks) and MQ (more than one
queue). Without FLUSH negotiated the disk is write-through (spec 5.2.6.2):
every write is followed by an fdatasync.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import NamedTuple

from mpvmm.errors import StateError
from mpvmm.virtio import spec
from mpvmm.virtio.descriptors import DescriptorChain
from mpvmm.virtio.device import VirtioDevice
from mpvmm.virtio.disk import SECTOR_SIZE, DiskFile
from mpvmm.virtio.faults import VirtqueueError

# --- Feature bits. ---
F_SEG_MAX = 2  # seg_max says how many data buffers a request may have
F_RO = 5  # the disk is read-only
F_FLUSH = 9  # the FLUSH command exists (a write-back cache)
F_MQ = 12  # num_queues request queues
F_DISCARD = 13
F_WRITE_ZEROES = 14

# --- Request types. ---
T_IN = 0  # read sectors
T_OUT = 1  # write sectors
T_FLUSH = 4
T_GET_ID = 8  # a 20-byte serial
T_DISCARD = 11
T_WRITE_ZEROES = 13

# --- Status byte. ---
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

QUEUE_SIZE = 256
MAX_QUEUES = 64
# Header and status take two descriptors; the rest of a ring-sized chain is data.
SEG_MAX = QUEUE_SIZE - 2
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES
# Discard and write-zeroes segments: le64 sector, le32 num_sectors, le32 flags.
WRITE_ZEROES_FLAG_UNMAP = 1
MAX_DISCARD_SECTORS = 1 << 21  # 1 GiB per segment
MAX_DISCARD_SEGMENTS = 16
MAX_WRITE_ZEROES_SECTORS = 1 << 21
MAX_WRITE_ZEROES_SEGMENTS = 1
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB, the page the host frees


class _RangeCommand(NamedTuple):
    """What differs between discard and write-zeroes."""

    feature: int
    max_segments: int
    max_sectors: int
    allowed_flags: int


# Discard takes no flag, not even unmap (spec 5.2.6.2: UNSUPP if it is set).
_DISCARD = _RangeCommand(F_DISCARD, MAX_DISCARD_SEGMENTS, MAX_DISCARD_SECTORS, 0)
_WRITE_ZEROES = _RangeCommand(F_WRITE_ZEROES, MAX_WRITE_ZEROES_SEGMENTS, MAX_WRITE_ZEROES_SECTORS, WRITE_ZEROES_FLAG_UNMAP)

_HEADER = struct.Struct("<IIQ")
_RANGE = struct.Struct("<QII")
# struct virtio_blk_config up to the secure-erase fields (72 bytes); fields we
# do not offer stay zero.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")


@dataclass
class BlockStats:
    """Plain counters; the owner turns them into metrics."""

    reads: int = 0
    writes: int = 0
    flushes: int = 0
    get_ids: int = 0
    discards: int = 0
    write_zeroes: int = 0
    bytes_read: int = 0  # from the disk into the guest
    bytes_written: int = 0  # from the guest onto the disk
    io_errors: int = 0  # requests answered VIRTIO_BLK_S_IOERR
    unsupported: int = 0  # requests answered VIRTIO_BLK_S_UNSUPP
    host_errors: int = 0  # of the IOERRs, those the host file caused (OSError)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Block(VirtioDevice):
    """A virtio block device backed by ``file`` (an open file object; the owner closes it)."""

    device_id = spec.DEVICE_ID_BLOCK

    def __init__(self, file, read_only: bool = False, disk_id: bytes = b"", queues: int = 1):
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"a block device has 1 to {MAX_QUEUES} queues, not {queues}")
        self.disk = DiskFile(file, read_only)
        self.read_only = read_only
        self.disk_id = disk_id[:ID_BYTES].ljust(ID_BYTES, b"\0")
        self.queue_sizes = (QUEUE_SIZE,) * queues
        self.stats = BlockStats()

    def device_features(self) -> int:
        bits = [F_SEG_MAX, F_FLUSH]
        if self.read_only:
            bits.append(F_RO)
        else:
            bits.append(F_WRITE_ZEROES)
            if self.disk.can_punch:
                bits.append(F_DISCARD)
        if len(self.queue_sizes) > 1:
            bits.append(F_MQ)
        return sum(spec.feature_bit(bit) for bit in bits)

    def state(self) -> dict:
        # Not the disk's contents: the file is the disk, and the restore is given it again.
        return {"sectors": self.disk.sectors, "read_only": self.read_only}

    def check_state(self, record: object) -> None:
        if not isinstance(record, dict) or record.get("sectors") != self.disk.sectors:
            sectors = record.get("sectors") if isinstance(record, dict) else None
            raise StateError(f"the saved disk had {sectors!r:.20} sectors, this one has {self.disk.sectors}")
        if record.get("read_only") is not self.read_only:
            raise StateError(f"the saved disk was {'' if record.get('read_only') else 'not '}read-only, this one "
                             f"is{'' if self.read_only else ' not'}")

    def config(self) -> bytes:
        return _CONFIG.pack(
            self.disk.sectors,  # capacity
            0,  # size_max (not offered)
            SEG_MAX,
            0, 0, 0,  # geometry (not offered)
            0,  # blk_size (not offered: 512)
            0, 0, 0, 0,  # topology (not offered)
            0,  # writeback (CONFIG_WCE not offered)
            0,  # unused
            len(self.queue_sizes),  # num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, DISCARD_SECTOR_ALIGNMENT,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS,
            int(self.disk.can_punch),  # write_zeroes_may_unmap
            0, 0, 0,  # secure erase (not offered)
        )  # fmt: skip

    # --- Requests. ---

    def process(self, index: int) -> int:
        queue = self.queues[index]
        completed = 0
        while (chain := queue.pop()) is not None:
            if chain.writable_length < 1:
                raise VirtqueueError(f"block request at head {chain.head} has no status byte")
            status, written = self._execute(chain)
            self.stats.io_errors += status == S_IOERR
            self.stats.unsupported += status == S_UNSUPP
            chain.write(self.memory, chain.writable_length - 1, bytes([status]))
            queue.stats.bytes_read += chain.readable_length
            queue.push_used(chain.head, written + 1)
            completed += 1
        return completed

    def _execute(self, chain: DescriptorChain) -> tuple[int, int]:
        """Carry out one request; returns (status, data bytes written into the guest)."""
        if chain.readable_length < _HEADER.size:
            return S_IOERR, 0
        kind, _reserved, sector = _HEADER.unpack(chain.read(self.memory, 0, _HEADER.size))
        handler = {
            T_IN: self._read,
            T_OUT: self._write,
            T_FLUSH: self._flush,
            T_GET_ID: self._get_id,
            T_DISCARD: self._discard,
            T_WRITE_ZEROES: self._write_zeroes,
        }.get(kind)
        if handler is None:
            return S_UNSUPP, 0
        out_length = chain.readable_length - _HEADER.size  # data after the header
        in_length = chain.writable_length - 1  # data before the status byte
        try:
            return handler(chain, sector, out_length, in_length)
        except OSError:
            self.stats.host_errors += 1
            return S_IOERR, 0

    def _in_range(self, sector: int, count: int) -> bool:
        return sector + count <= self.disk.sectors

    def _views(self, segments, writing: bool) -> list[memoryview]:
        return [view for address, length in segments for view in self.memory.views(address, length, writing)]

    def _read(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        if out_length or in_length % SECTOR_SIZE or not self._in_range(sector, in_length // SECTOR_SIZE):
            return S_IOERR, 0
        self.disk.read_into(self._views(chain.writable_segments(0, in_length), True), sector * SECTOR_SIZE)
        self.stats.reads += 1
        self.stats.bytes_read += in_length
        return S_OK, in_length

    def _write(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        if self.read_only or in_length or out_length % SECTOR_SIZE:
            return S_IOERR, 0
        if not self._in_range(sector, out_length // SECTOR_SIZE):
            return S_IOERR, 0
        segments = chain.readable_segments(_HEADER.size, out_length)
        self.disk.write_from(self._views(segments, False), sector * SECTOR_SIZE)
        self._write_through()
        self.stats.writes += 1
        self.stats.bytes_written += out_length
        return S_OK, 0

    def _flush(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        if not self.negotiated(F_FLUSH):
            return S_UNSUPP, 0
        self.disk.flush()
        self.stats.flushes += 1
        return S_OK, 0

    def _get_id(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        written = min(in_length, ID_BYTES)
        chain.write(self.memory, 0, self.disk_id[:written])
        self.stats.get_ids += 1
        return S_OK, written

    def _discard(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        def punch(offset: int, length: int, flags: int) -> None:
            self.disk.punch_hole(offset, length)

        status = self._ranged(chain, out_length, in_length, _DISCARD, punch)
        self.stats.discards += status == S_OK
        return status, 0

    def _write_zeroes(self, chain: DescriptorChain, sector: int, out_length: int, in_length: int) -> tuple[int, int]:
        def zero(offset: int, length: int, flags: int) -> None:
            self.disk.write_zeroes(offset, length, unmap=bool(flags & WRITE_ZEROES_FLAG_UNMAP))

        status = self._ranged(chain, out_length, in_length, _WRITE_ZEROES, zero)
        self.stats.write_zeroes += status == S_OK
        return status, 0

    def _ranged(self, chain: DescriptorChain, out_length: int, in_length: int, command: _RangeCommand, apply) -> int:
        """Carry out a discard or write-zeroes: its (sector, count, flags) segments follow the header."""
        if not self.negotiated(command.feature):
            return S_UNSUPP
        count = out_length // _RANGE.size
        if in_length or out_length % _RANGE.size or not 1 <= count <= command.max_segments:
            return S_IOERR
        data = chain.read(self.memory, _HEADER.size, out_length)
        ranges = [_RANGE.unpack_from(data, i * _RANGE.size) for i in range(count)]
        if any(flags & ~command.allowed_flags for _, _, flags in ranges):
            return S_UNSUPP
        if any(n > command.max_sectors or not self._in_range(start, n) for start, n, _ in ranges):
            return S_IOERR
        for start, n, flags in ranges:
            apply(start * SECTOR_SIZE, n * SECTOR_SIZE, flags)
        self._write_through()
        return S_OK

    def _write_through(self) -> None:
        if not self.negotiated(F_FLUSH):
            self.disk.flush()
