"""Descriptor chains: walking one from its head, checking every rule a guest could break.

A chain is read whole before the device sees any of it, so a device only
ever handles buffers that are known to be guest RAM. The checks (spec 2.7.5
and what QEMU, Firecracker and rust-vmm's ``virtio-queue`` enforce):

- every descriptor index is inside its table (the ring's, or an indirect one);
- every buffer [addr, addr + len) is guest RAM, including zero-length ones
  (an address past RAM is a broken driver even when nothing is read);
- a chain visits at most ``queue_size`` ring descriptors and at most the
  indirect table's own length inside it: that bounds the walk, so a loop ends
  as "too long" instead of spinning;
- the total length fits the used ring's 32-bit ``len`` (the spec forbids
  chains over 2**32 bytes, which is also what makes loops illegal);
- device-readable buffers come before device-writable ones;
- an indirect descriptor only where INDIRECT_DESC was negotiated, never with
  NEXT, never inside an indirect table, and its table a non-empty multiple of
  16 bytes of at most ``MAX_INDIRECT_DESCRIPTORS`` entries. The WRITE flag of
  the descriptor that points at a table is ignored, as the spec requires.

Any breach raises ``VirtqueueError``; the transport turns that into
``DEVICE_NEEDS_RESET``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from mpvmm.virtio import spec
from mpvmm.virtio.faults import VirtqueueError
from mpvmm.virtio.memory import GuestRam

# The largest indirect table accepted: QEMU's VIRTQUEUE_MAX_SIZE. Linux sizes
# its tables by the device's seg_max, which mpvmm devices keep far below it.
MAX_INDIRECT_DESCRIPTORS = 1024
# The used ring reports a chain's written length in 32 bits.
MAX_CHAIN_BYTES = (1 << 32) - 1

_DESCRIPTOR = struct.Struct("<QIHH")


class Segment(NamedTuple):
    """One guest buffer of a chain."""

    address: int
    length: int


@dataclass
class DescriptorChain:
    """A checked chain: its device-readable buffers, then its device-writable ones."""

    head: int  # the head's index in the ring's table: what goes back in the used ring
    readable: list[Segment] = field(default_factory=list)
    writable: list[Segment] = field(default_factory=list)
    readable_length: int = 0
    writable_length: int = 0
    descriptor_count: int = 0

    def read(self, memory: GuestRam, offset: int, length: int) -> bytes:
        """``length`` bytes of the readable buffers, starting ``offset`` bytes into them."""
        return b"".join(memory.read(a, n) for a, n in _slice(self.readable, offset, length))

    def write(self, memory: GuestRam, offset: int, data: bytes) -> None:
        """Write ``data`` into the writable buffers, ``offset`` bytes into them."""
        position = 0
        for address, size in _slice(self.writable, offset, len(data)):
            memory.write(address, data[position : position + size])
            position += size

    def readable_segments(self, offset: int, length: int) -> list[Segment]:
        return _slice(self.readable, offset, length)

    def writable_segments(self, offset: int, length: int) -> list[Segment]:
        return _slice(self.writable, offset, length)


def _slice(segments: list[Segment], offset: int, length: int) -> list[Segment]:
    """The parts of ``segments`` covering bytes [offset, offset + length) of their concatenation."""
    pieces = []
    for address, size in segments:
        if length <= 0:
            break
        if offset >= size:
            offset -= size
            continue
        take = min(size - offset, length)
        pieces.append(Segment(address + offset, take))
        length -= take
        offset = 0
    if length > 0:
        raise ValueError("slice runs past the chain's buffers")
    return pieces


def walk_chain(memory: GuestRam, table: int, queue_size: int, head: int, indirect_allowed: bool) -> DescriptorChain:
    """Read and check the chain starting at descriptor ``head`` of the ring's table at ``table``."""
    if head >= queue_size:
        raise VirtqueueError(f"head index {head} is outside the {queue_size}-entry descriptor table")
    chain = DescriptorChain(head=head)
    table_address, table_size, index = table, queue_size, head
    in_indirect = False
    visited = 0
    total = 0
    while True:
        if index >= table_size:
            where = "indirect table" if in_indirect else "descriptor table"
            raise VirtqueueError(f"next index {index} is outside the {table_size}-entry {where}")
        visited += 1
        if visited > table_size:
            raise VirtqueueError(f"chain from head {head} is longer than its {table_size}-entry table (a loop?)")
        address, length, flags, next_index = _DESCRIPTOR.unpack(
            memory.read(table_address + index * spec.DESCRIPTOR_SIZE, spec.DESCRIPTOR_SIZE)
        )
        chain.descriptor_count += 1
        if flags & spec.VIRTQ_DESC_F_INDIRECT:
            table_address, table_size = _indirect_table(memory, address, length, flags, in_indirect, indirect_allowed)
            index, visited, in_indirect = 0, 0, True
            continue
        if not memory.contains(address, length):
            raise VirtqueueError(f"descriptor {index} buffer {address:#x}+{length:#x} is not guest RAM")
        total += length
        if total > MAX_CHAIN_BYTES:
            raise VirtqueueError(f"chain from head {head} is longer than 2**32 bytes")
        if flags & spec.VIRTQ_DESC_F_WRITE:
            chain.writable.append(Segment(address, length))
            chain.writable_length += length
        elif chain.writable:
            raise VirtqueueError(f"chain from head {head} has a device-readable buffer after a writable one")
        else:
            chain.readable.append(Segment(address, length))
            chain.readable_length += length
        if not flags & spec.VIRTQ_DESC_F_NEXT:
            return chain
        index = next_index


def _indirect_table(
    memory: GuestRam, address: int, length: int, flags: int, in_indirect: bool, allowed: bool
) -> tuple[int, int]:
    """Check a descriptor that points at an indirect table; returns (table address, entries)."""
    if not allowed:
        raise VirtqueueError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
    if in_indirect:
        raise VirtqueueError("indirect descriptor inside an indirect table")
    if flags & spec.VIRTQ_DESC_F_NEXT:
        raise VirtqueueError("indirect descriptor with NEXT set")
    if length == 0 or length % spec.DESCRIPTOR_SIZE:
        raise VirtqueueError(f"indirect table length {length} is not a non-zero multiple of 16")
    entries = length // spec.DESCRIPTOR_SIZE
    if entries > MAX_INDIRECT_DESCRIPTORS:
        raise VirtqueueError(f"indirect table of {entries} entries is over the {MAX_INDIRECT_DESCRIPTORS} limit")
    if not memory.contains(address, length):
        raise VirtqueueError(f"indirect table {address:#x}+{length:#x} is not guest RAM")
    return address, entries
