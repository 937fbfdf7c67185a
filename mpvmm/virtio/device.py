"""What a virtio device is to its transport: an ID, queues, features, a config space, and a queue handler.

A device is a pure state machine: it sees guest RAM only through the
``GuestRam`` and ``SplitQueue`` objects the transport hands it at activation,
and talks to the host only through the objects it was built with (a file,
a sink, a random source). The transport owns the status, features and
interrupts; the device only handles chains.
"""

from __future__ import annotations

from mpvmm.errors import StateError
from mpvmm.virtio import spec
from mpvmm.virtio.memory import GuestRam
from mpvmm.virtio.queue import SplitQueue


class VirtioDevice:
    """Base of the devices; subclasses set ``device_id`` and ``queue_sizes`` and override ``process``."""

    device_id = 0
    queue_sizes: tuple[int, ...] = ()  # the QueueNumMax of each queue

    # Set while the driver has the device running (DRIVER_OK, no reset since).
    memory: GuestRam | None = None
    queues: list[SplitQueue] = []
    features = 0

    def device_features(self) -> int:
        """The device-specific feature bits (0-23) offered; the transport adds the ring and version bits."""
        return 0

    def config(self) -> bytes:
        """The device-specific configuration space, as the driver reads it now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space: ignored, none of our fields is writable."""

    def activate(self, memory: GuestRam, queues: list[SplitQueue], features: int) -> None:
        """The driver set DRIVER_OK with ``features`` negotiated; the ready queues are attached."""
        self.memory = memory
        self.queues = queues
        self.features = features

    def negotiated(self, bit: int) -> bool:
        return bool(self.features & spec.feature_bit(bit))

    def process(self, index: int) -> int:
        """Handle what is available on queue ``index``; returns the number of chains completed.

        May raise ``VirtqueueError`` (or let ``GuestMemoryError`` through) for
        a request that breaks the rules in a way no status can report; the
        transport then sets DEVICE_NEEDS_RESET.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """The driver reset the device: forget the running state (the backing objects stay)."""
        self.memory = None
        self.queues = []
        self.features = 0

    # --- Saved state: what the device keeps beyond its transport (most keep nothing). ---

    def state(self) -> dict:
        return {}

    def check_state(self, record: object) -> None:
        """StateError unless ``record`` is one ``state()`` of this device could have made."""
        if record != {}:
            raise StateError("the device's own record is not empty")

    def restore_state(self, record: dict) -> None:
        """Take a record ``check_state`` accepted."""
