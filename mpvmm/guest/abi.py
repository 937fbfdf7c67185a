"""Python mirror of the built-in guest's ABI (abi.h), checked against it by a test.

The supervisor fills ``GuestParams`` in guest RAM and reads each vCPU's
``GuestReport`` back out of the same shared memory.
"""

import ctypes
from importlib import resources
from pathlib import Path

ABI_VERSION = 3
PARAMS_MAGIC = 0x524150564D56504D
REPORT_MAGIC = 0x545045524D56504D
ATOMIC_COUNTERS = 8

# Workload names as the CLI takes them, in abi.h's enum order.
WORKLOADS = ("demo", "compute", "pio-null", "pio-device", "mmio", "uart", "atomics",
             "hostile", "triple-fault", "dirty", "doorbell", "writes")
# Workloads that exist to misbehave: their exit counts are not exact by design.
MISBEHAVING_WORKLOADS = ("hostile", "triple-fault")

# The guest's own counts, in abi.h's enum order.
OPS = (
    "pio_null_writes",
    "pio_device_writes",
    "pio_device_reads",
    "mmio_writes",
    "mmio_reads",
    "uart_bytes",
    "uart_syncs",
    "sleeps",
    "debug_exits",
    "atomic_increments",
    "compute_iterations",
    "read_mismatches",
    "hostile_port_writes",
    "hostile_port_reads",
    "hostile_mmio_writes",
    "hostile_mmio_reads",
    "dirty_pages",
    "pio_doorbells",
    "mmio_doorbells",
    "mmio_doorbell_misses",
)

# Which exit path each exit-causing op takes (see the route table).
OP_PATHS = {
    "pio_null_writes": "native",
    "sleeps": "native",
    "debug_exits": "native",
    "pio_device_writes": "posted",
    "mmio_writes": "posted",
    "uart_bytes": "posted",
    "pio_doorbells": "posted",
    "mmio_doorbells": "posted",
    "mmio_doorbell_misses": "posted",
    "pio_device_reads": "sync",
    "mmio_reads": "sync",
    "uart_syncs": "sync",
}
# Ops KVM takes in the kernel where the VMM registered their ranges (the raw
# bench loop registers none): the test devices' register writes (coalesced:
# they exit only when KVM's ring is full, then as "fallback") and their
# doorbells (an eventfd signal instead of an exit).
COALESCIBLE_OPS = ("pio_device_writes", "mmio_writes")
DOORBELL_OPS = ("pio_doorbells", "mmio_doorbells")
# Every access the guest makes to a device of the device model, whatever path it takes.
DEVICE_ACCESS_OPS = tuple(op for op, path in OP_PATHS.items() if path != "native")
# Which KVM exit reason each exit-causing op produces.
MMIO_OPS = ("mmio_writes", "mmio_reads", "mmio_doorbells", "mmio_doorbell_misses")

REPORT_STATE_ONLINE = 1
REPORT_STATE_DONE = 2
STATUS_OK = 0
STATUS_READ_MISMATCH = 3
STATUS_STATE_LOST = 4


class GuestParams(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("abi_version", ctypes.c_uint32),
        ("cpus", ctypes.c_uint32),
        ("workload", ctypes.c_uint32),
        ("demo_sleep_us", ctypes.c_uint32),
        ("stop", ctypes.c_uint64),
        ("reports_addr", ctypes.c_uint64),
        ("report_stride", ctypes.c_uint64),
        ("shared_addr", ctypes.c_uint64),
        ("mmio_testdev_addr", ctypes.c_uint64),
        ("uart_port", ctypes.c_uint16),
        ("null_port", ctypes.c_uint16),
        ("debug_exit_port", ctypes.c_uint16),
        ("sleep_port", ctypes.c_uint16),
        ("pio_testdev_port", ctypes.c_uint16),
        ("pio_doorbell_port", ctypes.c_uint16),
        ("reserved", ctypes.c_uint16 * 2),
        ("dirty_rate_mib", ctypes.c_uint32),
        ("dirty_round_us", ctypes.c_uint32),
        ("dirty_base", ctypes.c_uint64),
        ("dirty_size", ctypes.c_uint64),
        ("mmio_doorbell_addr", ctypes.c_uint64),
        ("doorbell_value", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
    ]


class GuestReport(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("state", ctypes.c_uint64),
        ("status", ctypes.c_uint64),
        ("pio_write_sum", ctypes.c_uint64),
        ("mmio_write_sum", ctypes.c_uint64),
        ("ops", ctypes.c_uint64 * len(OPS)),
    ]

    def op_counts(self) -> dict[str, int]:
        return dict(zip(OPS, self.ops))


class GuestShared(ctypes.Structure):
    _fields_ = [
        ("counters", ctypes.c_uint64 * ATOMIC_COUNTERS),
        ("uart_lock", ctypes.c_uint64),
    ]


def builtin_guest_path() -> Path:
    """The built-in guest's ELF, built by the package build (setup.py)."""
    return Path(str(resources.files(__package__).joinpath("builtin.elf")))
