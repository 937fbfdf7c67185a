"""virtio devices as pure state machines: the virtio-mmio transport, split virtqueues, block, console, entropy.

Nothing here opens a socket, starts a process or touches KVM: a device
process gives the core guest RAM (``GuestRam`` over its mmap of the shared
guest-RAM object), a trigger for the interrupt (an irqfd) and the device's
host objects (a file, a sink, a random source), and calls
``MmioTransport.read``/``write`` for register accesses and ``notify`` for
ioeventfd kicks. Design: ``docs/virtio.md``.
"""

from mpvmm.virtio.block import Block
from mpvmm.virtio.console import Console
from mpvmm.virtio.entropy import Entropy
from mpvmm.virtio.faults import DiskError, GuestMemoryError, VirtioError, VirtqueueError
from mpvmm.virtio.memory import GuestRam, RamRegion
from mpvmm.virtio.mmio import MmioTransport

__all__ = [
    "Block",
    "Console",
    "DiskError",
    "Entropy",
    "GuestMemoryError",
    "GuestRam",
    "MmioTransport",
    "RamRegion",
    "VirtioError",
    "VirtqueueError",
]
