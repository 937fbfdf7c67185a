"""Small devices of the mpvmm machine: the test device and sinks.

Both are pure state machines with ``read(offset, size)`` and
``write(offset, size, value)``, like the UART; the bus gives them offsets.
"""

from __future__ import annotations

from mpvmm.devicemodel.bus import NO_KERNEL_ACCESS, BusRange, Doorbell, KernelAccess
from mpvmm.devicemodel.device_state import expect_keys, expect_uint
from mpvmm.errors import DeviceModelError

# The test device answers every read with this pattern XOR the offset, so a
# guest can check that the value it got came from the right register and
# width (a stale or misrouted reply would not match).
TESTDEV_PATTERN = 0x5A5A5A5A5A5A5A5A

# Sums wrap like the guest's own 64-bit arithmetic, and stay packable by
# msgpack (which stops at 2**64 - 1) in the stats reply.
_SUM_MASK = (1 << 64) - 1
# The value that rings a doorbell declared with a datamatch; others are misses.
TESTDEV_DOORBELL_VALUE = 1
# Sequenced writes (the built-in guest's): the top byte of a 4-byte value and
# the top half of an 8-byte one name the vCPU, the rest counts up by one.
_SEQUENCE_SPLIT = {4: 24, 8: 32}
_SEQUENCE_SOURCES = 1024  # vCPU numbers followed; a guest cannot make the table grow past it


def all_ones(size: int) -> int:
    """What a read from nothing returns: every data line pulled high."""
    return (1 << (8 * size)) - 1


def testdev_pattern(offset: int, size: int) -> int:
    """The value a read of ``size`` bytes at ``offset`` of the test device returns."""
    return (TESTDEV_PATTERN ^ offset) & all_ones(size)


# Its name starts with "test": keep pytest from collecting it where imported.
testdev_pattern.__test__ = False  # type: ignore[attr-defined]


class TestDevice:
    """The target of the built-in guest's pio-device, mmio and doorbell workloads.

    ``registers`` bytes of write registers, which it declares coalescible
    (their writes only add up, so they may wait in KVM's ring), then a
    doorbell of ``doorbell_size`` bytes (rung by any value, or only by
    ``datamatch``). It counts what it sees so that a test can compare the
    guest's own report of what it did with what reached the device model,
    and checks the order of sequenced writes: each vCPU's must count up by
    one, whatever path they took (``order_errors``).
    """

    __test__ = False  # a device, not a pytest test class

    def __init__(self, registers: int = 8, doorbell_size: int = 4, datamatch: int | None = None) -> None:
        self.registers = registers
        self.datamatch = datamatch
        self.kernel_access = KernelAccess(coalesced=(BusRange(0, registers),),
                                          doorbells=(Doorbell(registers, doorbell_size, datamatch),))
        self.writes = 0
        self.write_sum = 0
        self.reads = 0
        self.doorbells = 0
        self.doorbell_misses = 0
        self.order_errors = 0
        self._last_sequence: dict[tuple[int, int], int] = {}

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return testdev_pattern(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset >= self.registers:
            # The doorbell, reached by an exit: a value it matches rings it as
            # KVM's ioeventfd would have; any other is a miss.
            if self.datamatch is None or value == self.datamatch:
                self.doorbells += 1
            else:
                self.doorbell_misses += 1
            return
        self.writes += 1
        self.write_sum = (self.write_sum + (value & all_ones(size))) & _SUM_MASK
        self._check_order(size, value)

    def doorbell(self, offset: int, count: int) -> None:
        """KVM signalled the doorbell's eventfd ``count`` times."""
        self.doorbells += count

    def _check_order(self, size: int, value: int) -> None:
        split = _SEQUENCE_SPLIT.get(size)
        if split is None:
            return
        if value >> split >= _SEQUENCE_SOURCES:
            return
        source, sequence = (size, value >> split), value & ((1 << split) - 1)
        last = self._last_sequence.get(source)
        if last is not None and sequence != (last + 1) & ((1 << split) - 1):
            self.order_errors += 1
        self._last_sequence[source] = sequence

    def stats(self) -> dict[str, int]:
        return {"writes": self.writes, "write_sum": self.write_sum, "reads": self.reads,
                "doorbells": self.doorbells, "doorbell_misses": self.doorbell_misses,
                "order_errors": self.order_errors}

    # Its counts are its state: a restored VM's totals go on from the saved
    # ones, and each vCPU's sequence goes on where it was.
    def state(self) -> dict:
        sequences = [[size, source, last] for (size, source), last in sorted(self._last_sequence.items())]
        return {**self.stats(), "sequences": sequences}

    @classmethod
    def from_state(cls, state: object, **layout) -> "TestDevice":
        """Rebuilt from ``state()``; ``layout`` is the constructor's (registers, doorbell), which is not state."""
        keys = ("writes", "write_sum", "reads", "doorbells", "doorbell_misses", "order_errors", "sequences")
        expect_keys(state, keys, "test device")
        device = cls(**layout)
        for key in keys[:-1]:
            setattr(device, key, expect_uint(state[key], 64, f"test device {key}"))
        sequences = state["sequences"]
        if not isinstance(sequences, list) or len(sequences) > 2 * _SEQUENCE_SOURCES:
            raise DeviceModelError("test device sequences must be a list of [size, source, last]")
        for entry in sequences:
            if not isinstance(entry, list) or len(entry) != 3 or entry[0] not in _SEQUENCE_SPLIT:
                raise DeviceModelError("test device sequences must be a list of [size, source, last]")
            size, source, last = entry
            split = _SEQUENCE_SPLIT[size]
            if type(source) is not int or not 0 <= source < _SEQUENCE_SOURCES:
                raise DeviceModelError(f"test device sequence source must be below {_SEQUENCE_SOURCES}")
            device._last_sequence[(size, source)] = expect_uint(last, split, "test device sequence")
        return device


class Sink:
    """Ports a guest pokes that we deliberately ignore, like kvmtool's x86/ioport.c.

    Registering them makes "unmapped" in the stats mean really unmapped,
    and says in the machine's device list that ignoring them is a choice.
    Reads return all ones (on the PCI data port that means "no device"),
    writes are dropped; both are counted.
    """

    kernel_access = NO_KERNEL_ACCESS  # writes are dropped, but counted as they come

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
