"""Errors of the virtio core: guest-memory faults, broken virtqueue rules, unusable disks.

A guest's mistakes never leave the core as exceptions: the transport turns
``GuestMemoryError`` and ``VirtqueueError`` into the ``DEVICE_NEEDS_RESET``
status. Only ``DiskError`` reaches a user, when a backing file cannot be a disk.
"""

from mpvmm.errors import MpvmmError, UsageError


class VirtioError(MpvmmError):
    """Root of the virtio core's errors."""


class GuestMemoryError(VirtioError):
    """An access touched guest-physical addresses that are not RAM."""


class VirtqueueError(VirtioError):
    """The driver broke the virtqueue rules (a bad ring or descriptor chain): the device needs a reset."""


class DiskError(UsageError):
    """A backing file cannot serve as a virtio-blk disk (not a regular file, unreadable)."""
