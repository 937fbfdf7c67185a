"""The virtio-mmio register layout, version 2 (spec 4.2.2): what a guest sees in a device's window.

Offsets are from the start of the window; every control register is 32 bits
wide. The device model places each window (``WINDOW_SIZE``) on its bus and in
the DSDT, and puts an ioeventfd on ``QUEUE_NOTIFY``.
"""

# --- Register offsets (spec 4.2.2, table "MMIO Device Register Layout"); all 32-bit. ---
MAGIC_VALUE = 0x000  # R: "virt"
VERSION = 0x004  # R: 2, the non-legacy interface
DEVICE_ID = 0x008  # R: the virtio device type; 0 would mean "no device here"
VENDOR_ID = 0x00C  # R
DEVICE_FEATURES = 0x010  # R: 32 feature bits, chosen by DEVICE_FEATURES_SEL
DEVICE_FEATURES_SEL = 0x014  # W
DRIVER_FEATURES = 0x020  # W: the driver's accepted bits, word DRIVER_FEATURES_SEL
DRIVER_FEATURES_SEL = 0x024  # W
QUEUE_SEL = 0x030  # W: which queue the QUEUE_* registers below address
QUEUE_NUM_MAX = 0x034  # R: the selected queue's largest size; 0 = no such queue
QUEUE_NUM = 0x038  # W: the size the driver chose
QUEUE_READY = 0x044  # RW: the selected queue is configured and in use
QUEUE_NOTIFY = 0x050  # W: the index of a queue with new buffers (the "kick")
INTERRUPT_STATUS = 0x060  # R: why the interrupt was raised
INTERRUPT_ACK = 0x064  # W: clears those bits
STATUS = 0x070  # RW: device status; 0 resets
QUEUE_DESC_LOW = 0x080  # W: descriptor table address, low and high halves
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090  # W: available ring address
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0  # W: used ring address
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC  # W: shared memory region: we have none
SHM_LEN_LOW = 0x0B0  # R: all ones for "no such region"
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC  # R: changes whenever the config space may have changed
CONFIG = 0x100  # the device-specific configuration space starts here

MAGIC = 0x74726976  # "virt" in little-endian
MMIO_VERSION = 2
VENDOR = int.from_bytes(b"MPVM", "little")
# One page per device: Linux maps the window with ioremap, and a page of its
# own lets an ioeventfd or a memory slot sit on it alone.
WINDOW_SIZE = 0x1000

# --- InterruptStatus bits. ---
INTERRUPT_USED_BUFFER = 1  # a queue's used ring has news
INTERRUPT_CONFIG_CHANGE = 2  # the config space (or DEVICE_NEEDS_RESET) changed
