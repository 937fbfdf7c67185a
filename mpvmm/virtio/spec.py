"""The numbers the virtio 1.2 specification fixes, shared by the transport, the queues and the devices.

Names follow the specification (and Linux's ``include/uapi/linux/virtio_*.h``)
so the text reads straight onto the code. Device-specific numbers (block
request types, the console's queues) live with their device.
"""

# --- Device IDs (spec 5): what the DeviceID register reports. ---
DEVICE_ID_BLOCK = 2
DEVICE_ID_CONSOLE = 3
DEVICE_ID_ENTROPY = 4

# --- Device status bits (spec 2.1): set by the driver, one step at a time. ---
STATUS_ACKNOWLEDGE = 1  # the guest noticed the device
STATUS_DRIVER = 2  # the guest has a driver for it
STATUS_DRIVER_OK = 4  # the driver is set up: the device may use its queues
STATUS_FEATURES_OK = 8  # the driver's features are final; cleared by the device if refused
STATUS_DEVICE_NEEDS_RESET = 64  # set by the device: an error it cannot recover from without a reset
STATUS_FAILED = 128  # the driver gave up on the device

# --- Reserved feature bits (spec 6), offered by every mpvmm device. ---
F_INDIRECT_DESC = 28  # VIRTIO_RING_F_INDIRECT_DESC: descriptors may point at descriptor tables
F_EVENT_IDX = 29  # VIRTIO_RING_F_EVENT_IDX: used_event / avail_event notification suppression
F_VERSION_1 = 32  # VIRTIO_F_VERSION_1: a 1.x device; virtio-mmio version 2 requires it
F_ACCESS_PLATFORM = 33  # an IOMMU between device and RAM: never offered
F_RING_PACKED = 34  # packed virtqueues: never offered (split queues only)

# --- Split virtqueue layout (spec 2.7). ---
QUEUE_SIZE_LIMIT = 32768  # the largest queue size a split queue may have
DESCRIPTOR_SIZE = 16  # le64 addr, le32 len, le16 flags, le16 next
DESCRIPTOR_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4
USED_ELEMENT_SIZE = 8  # le32 id, le32 len
RING_HEADER_SIZE = 4  # le16 flags, le16 idx in front of both rings
# Descriptor flags.
VIRTQ_DESC_F_NEXT = 1  # the chain continues at `next`
VIRTQ_DESC_F_WRITE = 2  # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors
# Ring flags without EVENT_IDX.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # the driver asks for no used-buffer notifications
VIRTQ_USED_F_NO_NOTIFY = 1  # the device asks for no available-buffer notifications


def descriptor_table_size(queue_size: int) -> int:
    return DESCRIPTOR_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size], used_event: the spec counts used_event whether or not EVENT_IDX is used."""
    return RING_HEADER_SIZE + 2 * queue_size + 2


def used_ring_size(queue_size: int) -> int:
    """flags, idx, ring[queue_size] of (id, len), avail_event."""
    return RING_HEADER_SIZE + USED_ELEMENT_SIZE * queue_size + 2


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from ``old_idx`` to ``new_idx`` crossed ``event_idx`` (16-bit wrapping).

    The rule of spec 2.7.10 (``vring_need_event`` in Linux): the other side
    asked to be told once the index passes ``event_idx``, so it wants a
    notification exactly when ``event_idx`` lies in ``[old_idx, new_idx)``.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def feature_bit(bit: int) -> int:
    return 1 << bit
