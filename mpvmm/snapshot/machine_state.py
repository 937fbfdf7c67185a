"""Everything a VM is besides guest RAM, captured from a paused VM and applied to a built one.

A ``MachineState`` is the machine's description (vCPUs, RAM size, the guest
as its ``describe()`` says), each vCPU's and the VM's KVM state
(kvm_state.py), one record per device of the device model, keyed by the
device's name, and one per virtio device (its process's, keyed
``virtio/NAME``; the machine record lists those devices and their backing,
so a restore builds them again). As records (records.py) it is what a
snapshot's state file and the end of a migration stream hold, in the same
order: machine, vCPUs, VM, devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpvmm.errors import DeviceModelError, StateError
from mpvmm.snapshot import records
from mpvmm.snapshot.kvm_state import VcpuState, VmState
from mpvmm.supervisor.virtio_devices import check_described

VIRTIO_PREFIX = "virtio/"  # a virtio device's record name: its process's, not the device model's


def describe_machine(vm) -> dict:
    """The machine ``vm`` (supervisor.run.RunningVm) is: what a restore must build."""
    machine = {"cpus": vm.config.cpus, "memory": vm.config.memory, "guest": vm.guest.describe()}
    virtio = vm.virtio.describe()
    if virtio is not None:
        machine["virtio"] = virtio
    return machine


@dataclass(frozen=True)
class MachineState:
    machine: dict  # describe_machine()
    vcpus: tuple[VcpuState, ...]
    vm: VmState
    devices: dict[str, dict]  # device name -> its state() record
    virtio: dict[str, dict] = field(default_factory=dict)  # virtio device name -> its process's record

    @classmethod
    def capture(cls, vm) -> "MachineState":
        """Read ``vm`` (a RunningVm whose vCPUs are paused) whole; the devices meanwhile."""
        with vm.device_model.saving_state() as devices:
            vcpus, vm_state = vm.host.machine.capture_state()
            virtio = vm.virtio.save_state()
        return cls(describe_machine(vm), tuple(vcpus), vm_state, devices, virtio)

    def apply(self, vm) -> None:
        """Write this state into ``vm`` (built from the same description, not started); the devices meanwhile."""
        if len(self.vcpus) != len(vm.vcpus):
            raise StateError(f"the saved state has {len(self.vcpus)} vCPUs, the VM {len(vm.vcpus)}")
        try:
            with vm.device_model.restoring_state(self.devices):
                vm.host.machine.restore_state(self.vcpus, self.vm)
                vm.virtio.restore_state(self.virtio)
        except DeviceModelError as err:
            raise StateError(str(err)) from err

    # --- As records. ---

    def to_records(self) -> list[tuple[int, dict]]:
        return ([(records.MACHINE, self.machine)]
                + [(records.VCPU, vcpu.to_record()) for vcpu in self.vcpus]
                + [(records.VM, self.vm.to_record())]
                + [(records.DEVICE, {"name": name, "state": state}) for name, state in self.devices.items()]
                + [(records.DEVICE, {"name": VIRTIO_PREFIX + name, "state": state})
                   for name, state in self.virtio.items()])

    @classmethod
    def from_records(cls, items: list[tuple[int, object]]) -> "MachineState":
        """Rebuild from decoded records, in to_records' order; refuses anything out of place."""
        machine = None
        vcpus: list[VcpuState] = []
        vm_state = None
        devices: dict[str, dict] = {}
        virtio: dict[str, dict] = {}
        for kind, payload in items:
            if kind == records.MACHINE and machine is None:
                machine = check_machine(payload)
            elif kind == records.VCPU and machine is not None and vm_state is None:
                vcpus.append(VcpuState.from_record(payload))
            elif kind == records.VM and machine is not None and vm_state is None:
                vm_state = VmState.from_record(payload)
            elif kind == records.DEVICE and vm_state is not None:
                name, state = _device_record(payload)
                into = virtio if name.startswith(VIRTIO_PREFIX) else devices
                name = name.removeprefix(VIRTIO_PREFIX)
                if name in into:
                    raise StateError(f"two records for device {name}")
                into[name] = state
            else:
                raise StateError(f"a {records.name(kind)} record out of place")
        if machine is None or vm_state is None:
            raise StateError("the machine or VM record is missing")
        if [vcpu.index for vcpu in vcpus] != list(range(machine["cpus"])):
            raise StateError(f"the machine has {machine['cpus']} vCPUs but the records are for "
                             f"{[vcpu.index for vcpu in vcpus]}")
        described = machine.get("virtio", {"devices": []})["devices"]
        if sorted(virtio) != sorted(device["name"] for device in described):
            raise StateError(f"the virtio records ({', '.join(sorted(virtio)) or 'none'}) are not those of the "
                             f"machine's virtio devices")
        return cls(machine, tuple(vcpus), vm_state, devices, virtio)


def check_machine(payload: object) -> dict:
    """A machine record's shape (its guest's fields are the guest kind's to check)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("guest"), dict):
        raise StateError("the machine record is not a map with a guest")
    cpus, memory = payload.get("cpus"), payload.get("memory")
    if type(cpus) is not int or not 1 <= cpus <= 4096:
        raise StateError(f"the machine record's vCPU count {cpus!r:.20} is not 1 to 4096")
    if type(memory) is not int or memory <= 0 or memory % 4096:
        raise StateError(f"the machine record's RAM size {memory!r:.20} is not a positive number of pages")
    if "virtio" in payload:
        check_described(payload["virtio"])
    return payload


def _device_record(payload: object) -> tuple[str, dict]:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise StateError("a device record is not a map with a name")
    state = payload.get("state")
    if not isinstance(state, dict):
        raise StateError(f"device {payload['name']}'s state is not a map")
    return payload["name"], state

