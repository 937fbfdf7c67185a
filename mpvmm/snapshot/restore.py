"""A guest brought back from saved state: ``mpvmm start --restore DIR``, and the base of an arriving one.

A ``RestoredGuest`` wraps the Guest of the kind it was saved as (the
built-in guest, looking at its parameter block and reports in the restored
RAM, or a Linux kernel), which answers for counts, stopping and endings;
its own ``restore`` writes the saved vCPU, VM and device state into the
built VM just before it starts, so the run carries on where it stopped.
``SnapshotSource`` is what ``--restore`` chooses: the snapshot read and
checked before anything is created.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from mpvmm.devicemodel.machines import check_states
from mpvmm.errors import DeviceModelError, SnapshotError, StateError
from mpvmm.guest import abi
from mpvmm.snapshot import directory
from mpvmm.snapshot.machine_state import MachineState
from mpvmm.supervisor.builtin_guest import BuiltinGuest, BuiltinGuestSource
from mpvmm.supervisor.ending import GuestEvent
from mpvmm.supervisor.guest import Guest, GuestCounts, GuestSource, MachineSpec
from mpvmm.supervisor import virtio_devices
from mpvmm.supervisor.linux_guest import LinuxBoot, LinuxGuest
from mpvmm.vcpu_worker.outcome import VcpuOutcome

# Each guest kind's machine (device set, interrupt lines, host input), as the boot sources give them.
MACHINES: dict[str, MachineSpec] = {"builtin": BuiltinGuestSource.machine, "linux": LinuxBoot.machine}


def check_guest(machine: dict) -> None:
    """A saved machine's guest is a kind this mpvmm runs, with parameters it understands."""
    guest = machine["guest"]
    kind = guest.get("kind")
    if kind not in MACHINES:
        raise StateError(f"a guest of kind {kind!r}; this mpvmm restores {', '.join(MACHINES)}")
    if type(guest.get("entry")) is not int:
        raise StateError("the guest record has no entry point")
    if kind == "builtin":
        params = guest.get("params")
        if not isinstance(params, dict) or params.get("abi_version") != abi.ABI_VERSION:
            version = params.get("abi_version") if isinstance(params, dict) else None
            raise StateError(f"the built-in guest's ABI version is {version!r}; this mpvmm's is {abi.ABI_VERSION}")
        if params.get("cpus") != machine["cpus"] or guest.get("workload") not in abi.WORKLOADS:
            raise StateError("the built-in guest's parameters do not match the machine")


def check_state(state: MachineState) -> None:
    """Everything about a saved state that can be checked before anything is created."""
    check_guest(state.machine)
    try:
        check_states(MACHINES[state.machine["guest"]["kind"]].name, state.devices)
    except DeviceModelError as err:
        raise StateError(str(err)) from None


def attach_guest(machine: dict, memory) -> Guest:
    """The Guest of the saved kind, over guest RAM that already holds it."""
    guest, cpus = machine["guest"], machine["cpus"]
    if guest["kind"] == "linux":
        return LinuxGuest(guest["entry"], cpus)
    builtin = BuiltinGuest(memory, cpus, guest["entry"])
    if builtin.params.magic != abi.PARAMS_MAGIC or builtin.params.abi_version != abi.ABI_VERSION:
        raise StateError("guest RAM does not hold the built-in guest's parameter block")
    return builtin


def workload_label(machine: dict) -> str:
    """mpvmm_vm_info's workload label: the built-in guest's workload, or "linux"."""
    guest = machine["guest"]
    return guest["workload"] if guest["kind"] == "builtin" else "linux"


class RestoredGuest(Guest):
    """``inner`` (the saved kind's Guest) plus the state to write before the VM starts.

    An arriving guest learns both only at the end of its stream: until then
    ``inner`` is None and there is nothing to ask or stop.
    """

    def __init__(self, inner: Guest | None, state: MachineState | None):
        self.inner = inner
        self.state = state
        self.stop_grace_seconds = inner.stop_grace_seconds if inner is not None else 0.0

    def set_up_vcpus(self, kvm, vcpus: Sequence) -> None:
        pass  # restore() writes the saved state, CPUID included, before the first KVM_RUN

    def restore(self, vm, cancelled: Callable[[], int | None]) -> None:
        self.state.apply(vm)

    def request_stop(self) -> None:
        if self.inner is not None:
            self.inner.request_stop()

    def counts(self, index: int) -> GuestCounts | None:
        return None if self.inner is None else self.inner.counts(index)

    def atomic_total(self) -> int | None:
        return None if self.inner is None else self.inner.atomic_total()

    def ending(self, outcome: VcpuOutcome) -> GuestEvent | None:
        return None if self.inner is None else self.inner.ending(outcome)

    def describe(self) -> dict:
        return self.inner.describe()

    def hand_over(self) -> None:
        if self.inner is not None:
            self.inner.hand_over()


class SavedMachineSource(GuestSource):
    """A source that brings a saved machine (a snapshot's, or one arriving): its vCPUs, RAM and guest."""

    def __init__(self, machine: dict):
        self.machine = MACHINES[machine["guest"]["kind"]]
        self.workload = workload_label(machine)
        self.cpus = machine["cpus"]
        self.memory_size = machine["memory"]
        self.virtio = machine.get("virtio")  # VirtioDevices.describe(), when the VM had virtio devices

    def machine_config(self, config):
        return dataclasses.replace(config, cpus=self.cpus, memory=self.memory_size, workload=self.workload,
                                   **virtio_devices.config_of(self.virtio))


class SnapshotSource(SavedMachineSource):
    """A snapshot directory, read and checked: its machine, its guest, its RAM."""

    def __init__(self, snapshot: directory.Snapshot):
        super().__init__(snapshot.state.machine)
        self.snapshot = snapshot

    @classmethod
    def from_directory(cls, path: str) -> "SnapshotSource":
        snapshot = directory.read(path)
        try:
            check_state(snapshot.state)
        except StateError as err:
            snapshot.close()
            raise SnapshotError(f"snapshot {path}: {err}") from None
        return cls(snapshot)

    def close(self, error: BaseException | None = None) -> None:
        self.snapshot.close()

    def load(self, memory) -> RestoredGuest:
        self.snapshot.copy_into(memory)
        try:
            inner = attach_guest(self.snapshot.state.machine, memory)
        except StateError as err:
            raise SnapshotError(f"snapshot {self.snapshot.path}: {err}") from None
        return RestoredGuest(inner, self.snapshot.state)
