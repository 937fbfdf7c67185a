"""The device set of the mpvmm machine and the dispatcher in front of it.

``DeviceModel`` owns the two buses and turns a decoded request into a device
access. It knows nothing about queues or sockets (``process.py`` adapts it),
so everything the guest can make it do is testable here with plain calls.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from mpvmm.devicemodel.bus import Bus, BusRange, Device
from mpvmm.devicemodel.devices import TESTDEV_DOORBELL_VALUE, Sink, TestDevice, all_ones
from mpvmm.devicemodel.protocol import (
    KIND_READ,
    KIND_WRITE_ACKED,
    REJECT_REASONS,
    SPACE_MMIO,
    SPACE_PIO,
    MessageRejected,
    Request,
    decode_request,
    encode_reply,
)
from mpvmm.devicemodel.serial import Serial
from mpvmm.errors import DeviceModelError
from mpvmm.x86.layout import (
    COM1_PORT,
    COM1_PORT_COUNT,
    MMIO_TESTDEV_ADDR,
    MMIO_TESTDEV_REGISTERS,
    MMIO_TESTDEV_SIZE,
    PIO_TESTDEV_PORT,
    PIO_TESTDEV_PORT_COUNT,
    PIO_TESTDEV_REGISTERS,
)

# Ports a guest (Linux) pokes that we claim on purpose and ignore; they are
# PC conventions rather than part of mpvmm's own map, so they live here.
# (Candidates for x86/layout.py once something else needs them.)
POST_DIAGNOSTIC_PORT = 0x80  # BIOS POST codes; Linux writes it as an I/O delay
PCI_CONFIG_PORT = 0xCF8  # CONFIG_ADDRESS (0xCF8) and CONFIG_DATA (0xCFC-0xCFF)
PCI_CONFIG_PORT_COUNT = 8

# Device names: labels in stats and metrics, so short and stable.
COM1_NAME = "com1"
PIO_TESTDEV_NAME = "testdev-pio"
MMIO_TESTDEV_NAME = "testdev-mmio"
PORT80_NAME = "port80"
PCI_CONFIG_NAME = "pci-config"

SPACE_NAMES = {SPACE_PIO: "pio", SPACE_MMIO: "mmio"}
OPS = ("read", "write")


def make_device(cls, states: dict | None, name: str, **hooks):
    """A new ``cls`` with ``hooks`` (its trigger, output ...), or one rebuilt from ``states[name]``.

    ``states`` is None for a machine that boots afresh, or the per-device
    records a restored machine saved, keyed by device name.
    """
    if states is None:
        return cls(**hooks)
    if name not in states:
        raise DeviceModelError(f"the saved device states have no record for {name}")
    return cls.from_state(states[name], **hooks)


def check_all_restored(states: dict | None, devices: dict[str, Device]) -> None:
    """Refuse saved states for devices this machine does not have."""
    if states is not None and set(states) - set(devices):
        raise DeviceModelError(f"the saved device states name devices this machine lacks: "
                               f"{', '.join(sorted(set(states) - set(devices)))}")


def build_buses(
    console_out: Callable[[bytes], None] | None = None,
    com1_trigger: Callable[[], None] | None = None,
    states: dict | None = None,
) -> tuple[Bus, Bus, dict[str, Device]]:
    """Create the machine's devices and place them on the pio and mmio buses.

    Returns ``(pio, mmio, devices_by_name)``. The test device has one instance
    per bus, so a test can tell which path a guest access took. With
    ``states`` (device name -> ``state()`` record) each device is rebuilt
    from its record instead.
    """
    pio, mmio = Bus("pio"), Bus("mmio")
    uart = make_device(Serial, states, COM1_NAME, trigger=com1_trigger, out=console_out)
    # The port device's doorbell takes any value, the MMIO one's only
    # TESTDEV_DOORBELL_VALUE (KVM_IOEVENTFD's datamatch): both kinds are used.
    pio_testdev = make_device(TestDevice, states, PIO_TESTDEV_NAME, registers=PIO_TESTDEV_REGISTERS,
                              doorbell_size=4)
    mmio_testdev = make_device(TestDevice, states, MMIO_TESTDEV_NAME, registers=MMIO_TESTDEV_REGISTERS,
                               doorbell_size=8, datamatch=TESTDEV_DOORBELL_VALUE)
    port80, pci_config = make_device(Sink, states, PORT80_NAME), make_device(Sink, states, PCI_CONFIG_NAME)
    pio.insert(BusRange(COM1_PORT, COM1_PORT_COUNT), uart, COM1_NAME)
    pio.insert(BusRange(PIO_TESTDEV_PORT, PIO_TESTDEV_PORT_COUNT), pio_testdev, PIO_TESTDEV_NAME)
    pio.insert(BusRange(POST_DIAGNOSTIC_PORT, 1), port80, PORT80_NAME)
    # Reads of CONFIG_ADDRESS as all ones make Linux's type-1 probe fail, and
    # all ones from CONFIG_DATA is "no device": the guest sees no PCI bus.
    pio.insert(BusRange(PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT), pci_config, PCI_CONFIG_NAME)
    mmio.insert(BusRange(MMIO_TESTDEV_ADDR, MMIO_TESTDEV_SIZE), mmio_testdev, MMIO_TESTDEV_NAME)
    devices = {
        COM1_NAME: uart,
        PIO_TESTDEV_NAME: pio_testdev,
        MMIO_TESTDEV_NAME: mmio_testdev,
        PORT80_NAME: port80,
        PCI_CONFIG_NAME: pci_config,
    }
    return pio, mmio, devices


class DeviceModel:
    """Dispatches requests to devices and counts what happened.

    ``console_out`` receives the UART's transmitted bytes; ``com1_trigger``
    raises the UART's interrupt (an irqfd write, once the supervisor passes
    one); ``machine`` is a ``(pio, mmio, devices)`` set to use instead of
    ``build_buses``'s. Guest-controlled input never raises out of ``handle`` or
    ``handle_message``: a device that fails is counted in ``device_errors``
    and a read of it answers all ones.
    """

    def __init__(
        self,
        console_out: Callable[[bytes], None] | None = None,
        com1_trigger: Callable[[], None] | None = None,
        *,
        machine: tuple[Bus, Bus, dict[str, Device]] | None = None,
    ):
        # ``machine`` replaces the standard device set (tests, other boards).
        if machine is None:
            machine = build_buses(console_out, com1_trigger)
        self.pio, self.mmio, self.devices = machine
        self._buses = {SPACE_PIO: self.pio, SPACE_MMIO: self.mmio}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.coalesced: Counter[str] = Counter()  # writes drained from KVM's coalesced ring
        self.doorbells: Counter[str] = Counter()  # eventfd signals KVM sent for a doorbell
        self.unmapped: Counter[tuple[str, str]] = Counter()
        self.rejected: Counter[str] = Counter()
        self.device_errors: Counter[str] = Counter()

    @property
    def uart(self) -> Serial:
        return self.devices[COM1_NAME]

    def handle(self, request: Request) -> int | None:
        """Perform one access; the value read for a read, 0 for an acknowledged write, None otherwise."""
        is_read = request.kind == KIND_READ
        op = "read" if is_read else "write"
        answered = is_read or request.kind == KIND_WRITE_ACKED
        found = self._buses[request.space].lookup(request.address)
        if found is None:
            self.unmapped[(SPACE_NAMES[request.space], op)] += 1
            return all_ones(request.size) if is_read else (0 if answered else None)
        device, name, offset = found
        self.requests[(name, op)] += 1
        if is_read:
            return self._read(device, name, offset, request.size)
        self._write(device, name, offset, request.size, request.value)
        return 0 if answered else None

    def _read(self, device: Device, name: str, offset: int, size: int) -> int:
        try:
            # Masked so that a device bug can never make an unencodable reply.
            return device.read(offset, size) & all_ones(size)
        except Exception:
            # A device bug must not stop the machine; the count makes it visible.
            self.device_errors[name] += 1
            return all_ones(size)

    def _write(self, device: Device, name: str, offset: int, size: int, value: int) -> None:
        try:
            device.write(offset, size, value)
        except Exception:
            self.device_errors[name] += 1

    def write_coalesced(self, space: int, address: int, size: int, value: int) -> None:
        """A write KVM took into its coalesced ring, drained now (coalesced.py)."""
        found = self._buses[space].lookup(address)
        if found is None:  # KVM only coalesces the ranges devices declared; still, never trust it blindly
            self.unmapped[(SPACE_NAMES[space], "write")] += 1
            return
        device, name, offset = found
        self.coalesced[name] += 1
        self._write(device, name, offset, size, value & all_ones(size))

    def doorbell(self, space: int, address: int, count: int) -> None:
        """KVM signalled the doorbell at ``address`` ``count`` times (its eventfd's counter)."""
        found = self._buses[space].lookup(address)
        if found is None:
            return
        device, name, offset = found
        self.doorbells[name] += count
        try:
            device.doorbell(offset, count)
        except Exception:
            self.device_errors[name] += 1

    def timer_deadline(self) -> float | None:
        """The earliest ``time.time()`` at which a device wants ``run_timers`` (the RTC's update cycle)."""
        deadlines = [device.timer_deadline() for device in self._timed()]
        return min((deadline for deadline in deadlines if deadline is not None), default=None)

    def run_timers(self) -> None:
        """Let every device with a clock catch up with it (each one checks its own deadline)."""
        for name, device in self.devices.items():
            if hasattr(device, "on_timer"):
                try:
                    device.on_timer()
                except Exception:
                    self.device_errors[name] += 1

    def _timed(self) -> list:
        return [device for device in self.devices.values() if hasattr(device, "timer_deadline")]

    def decode(self, data: bytes) -> Request | None:
        """The request in ``data``, or None: a malformed one is counted under its reason."""
        try:
            return decode_request(data)
        except MessageRejected as err:
            self.rejected[err.reason] += 1
            return None

    def handle_message(self, data: bytes) -> bytes | None:
        """Decode, dispatch and, for a read, encode the reply; None otherwise.

        A malformed message is counted under its reason and dropped.
        """
        request = self.decode(data)
        if request is None:
            return None
        value = self.handle(request)
        if value is None:
            return None
        return encode_reply(request.seq, value)

    def states(self) -> dict[str, dict]:
        """Every device's ``state()`` record, keyed by its name: what a snapshot keeps."""
        return {name: device.state() for name, device in self.devices.items()}

    def stats(self) -> dict:
        """Plain counters, nested by name (msgpack-able, string keys only)."""
        return {
            "requests": {
                name: {op: self.requests[(name, op)] for op in OPS} for name in self.devices
            },
            "unmapped": {
                space: {op: self.unmapped[(space, op)] for op in OPS}
                for space in SPACE_NAMES.values()
            },
            "coalesced": {name: self.coalesced[name] for name in self.devices},
            "doorbells": {name: self.doorbells[name] for name in self.devices},
            "rejected": {reason: self.rejected[reason] for reason in REJECT_REASONS},
            "device_errors": {name: self.device_errors[name] for name in self.devices},
            "devices": {name: device.stats() for name, device in self.devices.items()},
        }
