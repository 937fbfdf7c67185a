"""Small devices of the mpvmm machine: the test device and sinks.

Both are pure state machines with ``read(offset, size)`` and
``write(offset, size, value)``, like the UART; the bus gives them offsets.
"""

from __future__ import annotations

from mpvmm.devicemodel.device_state import expect_keys, expect_uint

# The test device answers every read with this pattern XOR the offset, so a
# guest can check that the value it got came from the right register and
# width (a stale or misrouted reply would not match).
TESTDEV_PATTERN = 0x5A5A5A5A5A5A5A5A

# Sums wrap like the guest's own 64-bit arithmetic, and stay packable by
# msgpack (which stops at 2**64 - 1) in the stats reply.
_SUM_MASK = (1 << 64) - 1


def all_ones(size: int) -> int:
    """What a read from nothing returns: every data line pulled high."""
    return (1 << (8 * size)) - 1


def testdev_pattern(offset: int, size: int) -> int:
    """The value a read of ``size`` bytes at ``offset`` of the test device returns."""
    return (TESTDEV_PATTERN ^ offset) & all_ones(size)


# Its name starts with "test": keep pytest from collecting it where imported.
testdev_pattern.__test__ = False  # type: ignore[attr-defined]


class TestDevice:
    """The target of the built-in guest's pio-device and mmio workloads.

    It counts what it sees so that a test can compare the guest's own report
    of what it did with what reached the device model.
    """

    __test__ = False  # a device, not a pytest test class

    def __init__(self) -> None:
        self.writes = 0
        self.write_sum = 0
        self.reads = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return testdev_pattern(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.write_sum = (self.write_sum + (value & all_ones(size))) & _SUM_MASK

    def stats(self) -> dict[str, int]:
        return {"writes": self.writes, "write_sum": self.write_sum, "reads": self.reads}

    # Its counts are its state: a restored VM's totals go on from the saved ones.
    def state(self) -> dict[str, int]:
        return self.stats()

    @classmethod
    def from_state(cls, state: object) -> "TestDevice":
        expect_keys(state, ("writes", "write_sum", "reads"), "test device")
        device = cls()
        device.writes, device.write_sum, device.reads = (
            expect_uint(state[key], 64, f"test device {key}") for key in ("writes", "write_sum", "reads"))
        return device


class Sink:
    """Ports a guest pokes that we deliberately ignore, like kvmtool's x86/ioport.c.

    Registering them makes "unmapped" in the stats mean really unmapped,
    and says in the machine's device list that ignoring them is a choice.
    Reads return all ones (on the PCI data port that means "no device"),
    writes are dropped; both are counted.
    """

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1

    def stats(self) -> dict[str, int]:
        return {"reads": self.reads, "writes": self.writes}

    def state(self) -> dict[str, int]:
        return self.stats()

    @classmethod
    def from_state(cls, state: object) -> "Sink":
        expect_keys(state, ("reads", "writes"), "sink")
        sink = cls()
        sink.reads, sink.writes = (expect_uint(state[key], 64, f"sink {key}") for key in ("reads", "writes"))
        return sink
