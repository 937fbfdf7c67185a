"""The device sets a device model can emulate, built afresh or from saved device states.

``builtin`` is the built-in guest's machine (machine.py), ``pc`` adds what a
Linux kernel needs (pc.py). A restored VM's devices come back from their
saved ``state()`` records, keyed by device name; ``check_states`` builds the
machine from them with no host attached, so the supervisor can refuse a bad
record before it creates anything.
"""

from __future__ import annotations

from typing import Callable

from mpvmm.devicemodel.bus import Bus, BusRange, Device
from mpvmm.devicemodel.machine import DeviceModel, build_buses, check_all_restored
from mpvmm.devicemodel.pc import build_pc_buses
from mpvmm.errors import DeviceModelError

MACHINES = ("builtin", "pc")

Machine = tuple[Bus, Bus, dict[str, Device]]


def build_machine(name: str, console_out: Callable[[bytes], None] | None,
                  triggers: dict[str, Callable[[], None]], on_event: Callable[[str], None],
                  states: dict | None = None) -> Machine:
    """The ``name`` machine's buses and devices; from ``states`` when given (all of them)."""
    if name == "pc":
        machine = build_pc_buses(console_out, triggers, on_event, states)
    elif name == "builtin":
        machine = build_buses(console_out, triggers.get("com1"), states)
    else:
        raise DeviceModelError(f"unknown machine {name!r} (known: {', '.join(MACHINES)})")
    check_all_restored(states, machine[2])
    return machine


def check_states(name: str, states: object) -> None:
    """Raise DeviceModelError unless ``states`` rebuild every device of machine ``name``."""
    if not isinstance(states, dict) or not all(isinstance(key, str) for key in states):
        raise DeviceModelError("saved device states must map device names to records")
    build_machine(name, None, {}, lambda event: None, states)


class MachineBuilder:
    """A device model's machine with its hooks to the host: built afresh, or again from saved states."""

    def __init__(self, name: str, console_out: Callable[[bytes], None],
                 triggers: dict[str, Callable[[], None]], on_event: Callable[[str], None],
                 virtio_links: tuple[tuple[str, int, int], ...] = ()):
        self.name, self.console_out, self.triggers, self.on_event = name, console_out, triggers, on_event
        self.virtio_links = virtio_links

    def build(self, states: dict | None = None) -> DeviceModel:
        """A DeviceModel over the machine; DeviceModelError if ``states`` do not rebuild it.

        Each virtio device's window forwards to its process (register_link.py);
        its state is that process's, not a record here.
        """
        pio, mmio, devices = build_machine(self.name, self.console_out, self.triggers, self.on_event, states)
        if self.virtio_links:
            # Imported only here: the virtio package is no part of a device model without virtio devices,
            # whose start-up time matters (a nested guest's device model starts under emulation).
            from mpvmm.virtio.mmio_registers import WINDOW_SIZE
            from mpvmm.virtio_device.register_link import RemoteRegisters
        for name, base, fd in self.virtio_links:
            mmio.insert(BusRange(base, WINDOW_SIZE), RemoteRegisters(fd), name)
        return DeviceModel(machine=(pio, mmio, devices))
