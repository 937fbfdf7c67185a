"""Reader for KVM's binary statistics (api.rst, "KVM_GET_STATS_FD").

A stats fd from ``Vm.stats_fd()`` or ``Vcpu.stats_fd()`` is a read-only file:
a ``kvm_stats_header``; an id string; ``num_desc`` descriptors, each a
``kvm_stats_desc`` followed by a NUL-padded name of ``name_size`` bytes; and
a data block of u64 values, each descriptor's ``size`` of them at its
``offset`` from the start of the block. Only the data changes, so the reader
parses the rest once and then reads the data block with one ``pread``.
"""

import ctypes
import os
from dataclasses import dataclass

from mpvmm.errors import KvmError
from mpvmm.kvm import bindings as b

_TYPE_NAMES = {
    b.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    b.KVM_STATS_TYPE_INSTANT: "instant",
    b.KVM_STATS_TYPE_PEAK: "peak",
    b.KVM_STATS_TYPE_LINEAR_HIST: "linear-hist",
    b.KVM_STATS_TYPE_LOG_HIST: "log-hist",
}
_UNIT_NAMES = {
    b.KVM_STATS_UNIT_NONE: "none",
    b.KVM_STATS_UNIT_BYTES: "bytes",
    b.KVM_STATS_UNIT_SECONDS: "seconds",
    b.KVM_STATS_UNIT_CYCLES: "cycles",
    b.KVM_STATS_UNIT_BOOLEAN: "boolean",
}
_BASES = {b.KVM_STATS_BASE_POW10: 10, b.KVM_STATS_BASE_POW2: 2}
_HISTOGRAMS = ("linear-hist", "log-hist")
_U64_SIZE = ctypes.sizeof(ctypes.c_uint64)


@dataclass(frozen=True)
class StatsDescriptor:
    """One statistic: a value (or histogram) in ``unit`` times ``base ** exponent``.

    ``type``, ``unit`` and ``base`` come from the descriptor's flags; a value
    a newer kernel adds and this reader does not know reads as "unknown(N)"
    (``base`` as 0) rather than failing.
    """

    name: str
    type: str  # cumulative, instant, peak, linear-hist, log-hist
    unit: str  # none, bytes, seconds, cycles, boolean
    base: int  # 10 or 2
    exponent: int
    size: int  # number of u64 items (buckets for a histogram)
    offset: int  # byte offset of the first item in the data block
    bucket_size: int  # linear histograms only

    @property
    def is_histogram(self) -> bool:
        return self.type in _HISTOGRAMS


def _name_of(table: dict[int, str], value: int) -> str:
    return table.get(value, f"unknown({value:#x})")


class StatsReader:
    """Parses a stats fd once and reads its current values on demand.

    Owns ``fd``: ``close()`` (or the end of a ``with`` block) closes it.
    """

    fd = -1  # class-level default, so close() works after a failed __init__

    def __init__(self, fd: int):
        self.fd = fd
        try:
            header = b.kvm_stats_header.from_buffer_copy(
                self._pread(ctypes.sizeof(b.kvm_stats_header), 0)
            )
            self.id = self._pread(header.name_size, header.id_offset).split(b"\0", 1)[0].decode()
            self.descriptors = self._parse_descriptors(header)
        except BaseException:
            self.close()
            raise
        self._data_offset = header.data_offset
        self._data_size = max(
            (d.offset + d.size * _U64_SIZE for d in self.descriptors), default=0
        )

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self.fd, size, offset)
        except OSError as err:
            raise KvmError(f"cannot read KVM statistics: {err.strerror}") from err
        if len(data) != size:
            raise KvmError(
                f"KVM statistics truncated: {len(data)} of {size} bytes at offset {offset}"
            )
        return data

    def _parse_descriptors(self, header: b.kvm_stats_header) -> list[StatsDescriptor]:
        fixed = ctypes.sizeof(b.kvm_stats_desc)
        stride = fixed + header.name_size
        block = self._pread(stride * header.num_desc, header.desc_offset)
        descriptors = []
        for i in range(header.num_desc):
            start = i * stride
            desc = b.kvm_stats_desc.from_buffer_copy(block, start)
            raw_name = block[start + fixed : start + stride]
            descriptors.append(
                StatsDescriptor(
                    name=raw_name.split(b"\0", 1)[0].decode(),
                    type=_name_of(_TYPE_NAMES, desc.flags & b.KVM_STATS_TYPE_MASK),
                    unit=_name_of(_UNIT_NAMES, desc.flags & b.KVM_STATS_UNIT_MASK),
                    base=_BASES.get(desc.flags & b.KVM_STATS_BASE_MASK, 0),
                    exponent=desc.exponent,
                    size=desc.size,
                    offset=desc.offset,
                    bucket_size=desc.bucket_size,
                )
            )
        return descriptors

    def read(self) -> dict[str, int | list[int]]:
        """Name -> value now: an int, or a list for histograms and multi-item stats."""
        data = self._pread(self._data_size, self._data_offset)
        values: dict[str, int | list[int]] = {}
        for desc in self.descriptors:
            items = [
                int.from_bytes(data[pos : pos + _U64_SIZE], "little")
                for pos in range(desc.offset, desc.offset + desc.size * _U64_SIZE, _U64_SIZE)
            ]
            values[desc.name] = items if desc.is_histogram or desc.size != 1 else items[0]
        return values

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "StatsReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
