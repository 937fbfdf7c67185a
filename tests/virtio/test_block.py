"""virtio-blk against a real file: every request as Linux's virtio_blk builds it, checked against the file."""

import os
import random
import struct

import pytest

from mpvmm.virtio import block, spec
from mpvmm.virtio.block import Block
from mpvmm.virtio.faults import DiskError
from tests.virtio.blk_driver import BlockGuest
from tests.virtio.driver import RecordingRam, make_ram

SECTOR = 512
DISK_SECTORS = 128


@pytest.fixture
def disk_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(14).randbytes(DISK_SECTORS * SECTOR))
    return path


def file_bytes(path, sector, length):
    with open(path, "rb") as f:
        f.seek(sector * SECTOR)
        return f.read(length)


@pytest.fixture
def guest(disk_path):
    with open(disk_path, "r+b", buffering=0) as f:
        yield BlockGuest(Block(f, disk_id=b"mpvmm-disk-0"))


def features_of(device):
    return {bit for bit in range(64) if device.device_features() >> bit & 1}


def test_features_and_config(disk_path):
    with open(disk_path, "a+b") as f:
        f.write(b"x" * 100)  # a partial last sector is not part of the capacity
    with open(disk_path, "r+b") as f:
        device = Block(f)
        assert features_of(device) == {block.F_SEG_MAX, block.F_FLUSH, block.F_WRITE_ZEROES, block.F_DISCARD}
        config = device.config()
        assert len(config) == 72
        capacity, size_max, seg_max = struct.unpack_from("<QII", config)
        assert (capacity, size_max, seg_max) == (DISK_SECTORS, 0, block.QUEUE_SIZE - 2)
        assert struct.unpack_from("<H", config, 34)[0] == 1  # num_queues
        assert struct.unpack_from("<III", config, 36) == (1 << 21, 16, 8)  # discard limits
        assert config[56] == 1  # write_zeroes_may_unmap: this filesystem punches holes
        assert features_of(Block(f, queues=4)) >= {block.F_MQ}
        assert struct.unpack_from("<H", Block(f, queues=4).config(), 34)[0] == 4
    with open(disk_path, "rb") as f:
        assert features_of(Block(f, read_only=True)) == {block.F_SEG_MAX, block.F_FLUSH, block.F_RO}


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"pieces": 4},
        {"split_header": True},
        {"indirect": True, "pieces": 8},
    ],
)
def test_reads_return_the_files_bytes(guest, disk_path, layout):
    status, data, used = guest.read(5, 4096, **layout)
    assert status == block.S_OK
    assert data == file_bytes(disk_path, 5, 4096)
    assert used == 4096 + 1  # data plus the status byte


def test_reads_into_high_ram(disk_path):
    with open(disk_path, "r+b") as f:
        guest = BlockGuest(Block(f))
        q = guest.queues[0]
        high = guest.driver.high_data.take(1024)
        q.add(out=[struct.pack("<IIQ", block.T_IN, 0, 7)], in_=[(high, 1024), 1])
        q.kick()
        assert guest.driver.memory.read(high, 1024) == file_bytes(disk_path, 7, 1024)


def test_writes_reach_the_file(guest, disk_path):
    data = bytes(range(256)) * 8
    assert guest.write(10, data) == block.S_OK
    assert file_bytes(disk_path, 10, len(data)) == data
    assert guest.read(10, len(data))[1] == data
    assert (guest.device.stats.writes, guest.device.stats.bytes_written) == (1, 2048)


def test_flush_syncs_the_file(guest, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    guest.write(0, bytes(SECTOR))
    assert synced == []  # FLUSH negotiated: a write-back cache
    assert guest.request(block.T_FLUSH)[0] == block.S_OK
    assert synced == [guest.device.disk.fd]


def test_without_flush_negotiated_the_disk_is_write_through(disk_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    with open(disk_path, "r+b") as f:
        guest = BlockGuest(Block(f), refuse=spec.feature_bit(block.F_FLUSH))
        assert guest.write(0, bytes(SECTOR)) == block.S_OK
        assert len(synced) == 1
        assert guest.request(block.T_FLUSH)[0] == block.S_UNSUPP


def test_get_id(guest):
    status, data, used = guest.request(block.T_GET_ID, in_lengths=[20])
    assert (status, data, used) == (block.S_OK, b"mpvmm-disk-0".ljust(20, b"\0"), 21)
    assert guest.request(block.T_GET_ID, in_lengths=[5])[1] == b"mpvmm"


def test_a_read_only_disk_refuses_writes(disk_path):
    before = disk_path.read_bytes()
    with open(disk_path, "rb") as f:
        guest = BlockGuest(Block(f, read_only=True))
        assert guest.write(0, b"x" * SECTOR) == block.S_IOERR
        assert guest.ranges(block.T_DISCARD, [(0, 8, 0)]) == block.S_UNSUPP  # not offered
        assert guest.ranges(block.T_WRITE_ZEROES, [(0, 8, 0)]) == block.S_UNSUPP
        assert guest.read(0, SECTOR)[0] == block.S_OK
    assert disk_path.read_bytes() == before


@pytest.mark.parametrize(
    "request_args, status",
    [
        ({"kind": block.T_IN, "sector": DISK_SECTORS, "in_lengths": [SECTOR]}, block.S_IOERR),
        ({"kind": block.T_IN, "sector": DISK_SECTORS - 1, "in_lengths": [2 * SECTOR]}, block.S_IOERR),
        ({"kind": block.T_IN, "sector": 2**64 - 1, "in_lengths": [SECTOR]}, block.S_IOERR),
        ({"kind": block.T_IN, "in_lengths": [100]}, block.S_IOERR),  # not whole sectors
        ({"kind": block.T_IN, "out_data": [b"x" * SECTOR], "in_lengths": [SECTOR]}, block.S_IOERR),
        ({"kind": block.T_OUT, "sector": DISK_SECTORS, "out_data": [b"x" * SECTOR]}, block.S_IOERR),
        ({"kind": block.T_OUT, "out_data": [b"x" * 100]}, block.S_IOERR),
        ({"kind": block.T_OUT, "out_data": [b"x" * SECTOR], "in_lengths": [SECTOR]}, block.S_IOERR),
        ({"kind": 99}, block.S_UNSUPP),
        ({"kind": 10}, block.S_UNSUPP),  # GET_LIFETIME: not offered
    ],
)
def test_bad_requests_get_an_error_status_and_touch_nothing(guest, disk_path, request_args, status):
    before = disk_path.read_bytes()
    got, data, used = guest.request(**request_args)
    assert got == status
    assert used == 1  # only the status byte
    assert disk_path.read_bytes() == before
    assert not guest.driver.needs_reset


def test_a_short_header_is_an_io_error(guest):
    q = guest.queues[0]
    _, writable = q.add(out=[b"\0" * 8], in_=[1])
    q.kick()
    assert guest.driver.memory.read(writable[0][0], 1) == bytes([block.S_IOERR])


def test_a_request_with_no_status_byte_needs_a_reset(guest):
    q = guest.queues[0]
    q.add(out=[struct.pack("<IIQ", block.T_IN, 0, 0)])
    q.kick()
    assert guest.driver.needs_reset
    assert "no status byte" in guest.driver.transport.needs_reset_reason


def test_the_status_byte_is_written_after_the_data(disk_path):
    buffer, memory = make_ram(RecordingRam)
    with open(disk_path, "r+b") as f:
        guest = BlockGuest(Block(f), memory=memory, buffer=buffer)
        q = guest.queues[0]
        _, writable = q.add(out=[struct.pack("<IIQ", block.T_IN, 0, 0)], in_=[SECTOR, 1])
        memory.accesses.clear()
        q.kick()
        writes = memory.writes()
        data_at = writes.index(writable[0])
        status_at = writes.index(writable[1])
        assert data_at < status_at
        assert all(a >= q.used for a, _ in writes[status_at + 1 :])  # then only the used ring


def test_a_file_that_shrank_underneath_gives_io_errors(guest, disk_path):
    os.truncate(disk_path, 64 * SECTOR)
    assert guest.read(100, SECTOR)[0] == block.S_IOERR
    assert guest.device.stats.host_errors == 1
    assert guest.read(0, SECTOR)[0] == block.S_OK


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def test_discard_punches_holes_in_a_sparse_file(guest, disk_path):
    os.fsync(guest.device.disk.fd)
    before = allocated_bytes(disk_path)
    assert guest.ranges(block.T_DISCARD, [(0, 32, 0), (64, 32, 0)]) == block.S_OK
    assert allocated_bytes(disk_path) <= before - 64 * SECTOR
    assert file_bytes(disk_path, 0, 32 * SECTOR) == bytes(32 * SECTOR)
    assert file_bytes(disk_path, 32, SECTOR) != bytes(SECTOR)  # untouched between the ranges
    assert os.path.getsize(disk_path) == DISK_SECTORS * SECTOR  # the size is kept


@pytest.mark.parametrize(
    "segments, status",
    [
        ([(0, 8, 1)], block.S_UNSUPP),  # discard takes no flags, not even unmap
        ([(DISK_SECTORS - 4, 8, 0)], block.S_IOERR),
        ([(0, (1 << 21) + 1, 0)], block.S_IOERR),  # over max_discard_sectors
        ([(0, 1, 0)] * 17, block.S_IOERR),  # over max_discard_seg
    ],
)
def test_bad_discards(guest, disk_path, segments, status):
    before = disk_path.read_bytes()
    assert guest.ranges(block.T_DISCARD, segments) == status
    assert disk_path.read_bytes() == before


@pytest.mark.parametrize("flags", [0, block.WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes(guest, disk_path, flags):
    os.fsync(guest.device.disk.fd)
    before = allocated_bytes(disk_path)
    assert guest.ranges(block.T_WRITE_ZEROES, [(16, 32, flags)]) == block.S_OK
    assert file_bytes(disk_path, 16, 32 * SECTOR) == bytes(32 * SECTOR)
    assert guest.read(16, 32 * SECTOR)[1] == bytes(32 * SECTOR)
    if flags:
        assert allocated_bytes(disk_path) < before
    assert guest.ranges(block.T_WRITE_ZEROES, [(0, 1, 2)]) == block.S_UNSUPP  # an unknown flag


def test_write_zeroes_without_fallocate_writes_zeroes(guest, disk_path, monkeypatch):
    def unsupported(fd, mode, offset, length):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr("mpvmm.virtio.disk.fallocate", unsupported)
    assert guest.ranges(block.T_WRITE_ZEROES, [(3, 5, 0)]) == block.S_OK
    assert file_bytes(disk_path, 3, 5 * SECTOR) == bytes(5 * SECTOR)
    assert file_bytes(disk_path, 8, SECTOR) != bytes(SECTOR)


def test_several_queues_serve_independently(disk_path):
    with open(disk_path, "r+b") as f:
        guest = BlockGuest(Block(f, queues=2))
        assert len(guest.queues) == 2
        assert guest.write(1, b"\x11" * SECTOR, queue=0) == block.S_OK
        assert guest.read(1, SECTOR, queue=1)[1] == b"\x11" * SECTOR
        stats = [q.stats for q in guest.driver.transport.queues]
        assert (stats[0].chains, stats[1].chains) == (1, 1)
        assert stats[0].bytes_read == 16 + SECTOR  # the header and the data it wrote


def test_files_that_cannot_be_disks(tmp_path, disk_path):
    with open(disk_path, "rb") as f:
        with pytest.raises(DiskError, match="open for reading and writing"):
            Block(f)
    fd = os.open(tmp_path, os.O_RDONLY)

    class Directory:
        def fileno(self):
            return fd

    try:
        with pytest.raises(DiskError, match="regular file or a block device"):
            Block(Directory(), read_only=True)
    finally:
        os.close(fd)
    with pytest.raises(ValueError):
        with open(disk_path, "r+b") as f:
            Block(f, queues=0)


def test_reads_and_writes_of_seg_max_segments(guest, disk_path):
    """seg_max data buffers in one indirect chain: the largest request Linux may build."""
    piece = 256
    data = random.Random(1).randbytes(block.SEG_MAX * piece)
    out = [data[i : i + piece] for i in range(0, len(data), piece)]
    q = guest.queues[0]
    q.add(out=[struct.pack("<IIQ", block.T_OUT, 0, 1)] + out, in_=[1], indirect=True)
    q.kick()
    assert q.take_used()
    assert file_bytes(disk_path, 1, len(data)) == data
    status, got, _ = guest.read(1, len(data), pieces=block.SEG_MAX, indirect=True)
    assert (status, got) == (block.S_OK, data)
