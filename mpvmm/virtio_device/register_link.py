"""Register accesses to a virtio device's MMIO window, from the device model to the device's process.

A guest access to a virtio-mmio window exits like any other MMIO access and
reaches the device model through its transport; the device model's bus has
a ``RemoteRegisters`` at each window, which passes the access on over a
``SOCK_SEQPACKET`` socketpair to the device process that owns the window.
Reads wait for the answer; writes do not (the link keeps their order, and
a read is answered only after every write before it). Only set-up and
interrupt acknowledgement take this path: the data path is guest RAM, the
ioeventfd doorbells and the irqfd, none of which passes through here
(docs/virtio.md, "Register accesses").

One packet per access, fixed size: ``<kind u8, size u8, pad, offset u32, value u64>``;
a read's answer is one ``<u64>``.
"""

from __future__ import annotations

import os
import struct

KIND_READ, KIND_WRITE = 0, 1
REQUEST = struct.Struct("<BBxxIQ")
REPLY = struct.Struct("<Q")
ACCESS_SIZES = (1, 2, 4, 8)


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class RemoteRegisters:
    """The device model's stand-in for a virtio device's window: every access goes to the device process.

    A device process that is gone makes reads answer all ones (as a missing
    device does) and writes vanish, counted in ``link_errors``; the
    supervisor sees it gone and ends the VM, naming it.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.link_errors = 0

    def read(self, offset: int, size: int) -> int:
        try:
            os.write(self.fd, REQUEST.pack(KIND_READ, size, offset, 0))
            reply = os.read(self.fd, REPLY.size)
        except OSError:
            reply = b""
        if len(reply) != REPLY.size:
            self.link_errors += 1
            return _all_ones(size)
        return REPLY.unpack(reply)[0] & _all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        try:
            os.write(self.fd, REQUEST.pack(KIND_WRITE, size, offset, value & _all_ones(size)))
        except OSError:
            self.link_errors += 1

    def stats(self) -> dict[str, int]:
        return {"link_errors": self.link_errors}

    def state(self) -> dict:
        return {}  # the device's state is its process's (virtio_device/server.py)


def serve(packet: bytes, read, write) -> bytes | None:
    """One access from the link, done through ``read(offset, size)`` or ``write(offset, size, value)``.

    Returns the answer to send for a read, None for a write or a malformed
    packet (ignored: only the device model writes to the link).
    """
    if len(packet) != REQUEST.size:
        return None
    kind, size, offset, value = REQUEST.unpack(packet)
    if size not in ACCESS_SIZES:
        return REPLY.pack(_all_ones(8)) if kind == KIND_READ else None
    if kind == KIND_READ:
        return REPLY.pack(read(offset, size) & _all_ones(size))
    if kind == KIND_WRITE:
        write(offset, size, value)
    return None
