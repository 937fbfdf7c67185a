"""Length-prefixed, checksummed records: the framing of snapshot state files and migration streams.

A record is a 12-byte little-endian header, then its payload:

    kind u16 | flags u16 (0) | payload length u32 | CRC-32 of the payload u32

Most payloads are one msgpack map; a ``PAGES`` payload is a guest RAM
offset (u64) followed by whole pages of RAM. Every kind has a size limit,
checked before a payload is read, so a corrupt or hostile length cannot
make a reader allocate what the record could never hold. The numbers are
written down in docs/snapshot.md and docs/migration.md; a reader refuses a
kind, a size or a checksum it does not expect with a StateError.
"""

from __future__ import annotations

import struct
import zlib

import msgpack

from mpvmm.errors import StateError

HEADER = struct.Struct("<HHII")
PAGE_OFFSET = struct.Struct("<Q")

# The machine state, in a snapshot's state file and at the end of a migration stream.
SNAPSHOT = 1  # a state file's first record: format name and version
MACHINE = 2  # the machine's description (machine_state.describe_machine)
VCPU = 3  # one per vCPU, in index order (kvm_state.VcpuState)
VM = 4  # the irqchip, PIT and clock (kvm_state.VmState)
DEVICE = 5  # one per device, keyed by its name
END = 6  # the last record: how many came before it, and guest RAM's size and checksum
# The migration stream (migration/stream.py).
HELLO = 16  # source -> destination: stream version, the machine, how RAM travels
READY = 17  # destination -> source: built, send RAM
PAGES = 19  # source -> destination: RAM offset and page data (binary payload)
ROUND = 20  # source -> destination: one pass over the dirty pages done; destination -> source: all of it received
PAUSED = 21  # source -> destination: the VM is paused, the rest and its state follow
DONE = 22  # source -> destination: the state is complete, start the VM
RESUMED = 23  # destination -> source: the VM runs here
CANCEL = 24  # either way: stop (or, for the destination, will not take this VM), and why

NAMES = {SNAPSHOT: "snapshot", MACHINE: "machine", VCPU: "vcpu", VM: "vm", DEVICE: "device", END: "end",
         HELLO: "hello", READY: "ready", PAGES: "pages", ROUND: "round",
         PAUSED: "paused", DONE: "done", RESUMED: "resumed", CANCEL: "cancel"}

MAX_PAGES_PAYLOAD = PAGE_OFFSET.size + (4 << 20)  # 4 MiB of pages per record
MAX_MESSAGE_PAYLOAD = 1 << 20  # a vCPU record is about 7 KiB; the largest map is far below this


def name(kind: int) -> str:
    return NAMES.get(kind, f"unknown ({kind})")


def max_payload(kind: int) -> int:
    return MAX_PAGES_PAYLOAD if kind == PAGES else MAX_MESSAGE_PAYLOAD


def crc32(data, start: int = 0) -> int:
    return zlib.crc32(data, start)


def header(kind: int, length: int, checksum: int) -> bytes:
    return HEADER.pack(kind, 0, length, checksum)


def encode(kind: int, payload: bytes) -> bytes:
    """One whole record."""
    return header(kind, len(payload), crc32(payload)) + payload


def pack(kind: int, message: dict) -> bytes:
    """A record whose payload is ``message`` as msgpack."""
    return encode(kind, msgpack.packb(message, use_bin_type=True))


def decode_header(data: bytes) -> tuple[int, int, int]:
    """(kind, payload length, CRC-32) of a record header; refuses unknown kinds and impossible sizes."""
    kind, flags, length, checksum = HEADER.unpack(data)
    if kind not in NAMES or flags:
        raise StateError(f"a record of unknown kind {kind} (flags {flags:#x}): not an mpvmm record, or corrupt")
    if length > max_payload(kind):
        raise StateError(f"a {name(kind)} record claims {length} bytes, more than such a record can hold")
    return kind, length, checksum


def check(kind: int, payload, checksum: int) -> None:
    if crc32(payload) != checksum:
        raise StateError(f"a {name(kind)} record ({len(payload)} bytes) fails its checksum: corrupt")


def unpack(kind: int, payload: bytes) -> object:
    """The msgpack map of a message record."""
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as err:  # msgpack raises several types for bad input
        raise StateError(f"a {name(kind)} record is not msgpack: {err}") from None
    if not isinstance(message, dict):
        raise StateError(f"a {name(kind)} record holds a {type(message).__name__}, not a map")
    return message


def parse(data: bytes) -> list[tuple[int, object]]:
    """Every record of a whole file, checked and decoded (PAGES payloads stay bytes)."""
    items: list[tuple[int, object]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < HEADER.size:
            raise StateError(f"truncated: {len(data) - offset} bytes where a record header should be")
        kind, length, checksum = decode_header(data[offset:offset + HEADER.size])
        offset += HEADER.size
        payload = data[offset:offset + length]
        if len(payload) < length:
            raise StateError(f"truncated: a {name(kind)} record needs {length} bytes, {len(payload)} are left")
        check(kind, payload, checksum)
        items.append((kind, payload if kind == PAGES else unpack(kind, payload)))
        offset += length
    return items
