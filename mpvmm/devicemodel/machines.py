"""The device sets a device model can emulate, built afresh or from saved device states.

``builtin`` is the built-in guest's machine (machine.py), ``pc`` adds what a
Linux kernel needs (pc.py). A restored VM's devices come back from their
saved ``state()`` records, keyed by device name; ``check_states`` builds the
machine from them with no host attached, so the supervisor can refuse a bad
record before it creates anything.
"""

from __future__ import annotations

from typing import Callable

from mpvmm.devicemodel.bus import Bus, Device
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
                 triggers: dict[str, Callable[[], None]], on_event: Callable[[str], None]):
        self.name, self.console_out, self.triggers, self.on_event = name, console_out, triggers, on_event

    def build(self, states: dict | None = None) -> DeviceModel:
        """A DeviceModel over the machine; DeviceModelError if ``states`` do not rebuild it."""
        return DeviceModel(machine=build_machine(self.name, self.console_out, self.triggers, self.on_event, states))
