"""A virtio device's state as a snapshot record, and back: the transport, its queues, the device.

What is saved is what the driver configured and where the rings stand: the
status, the negotiated features, the selectors, the interrupt status, and
per queue its layout and indexes (so the device goes on exactly where it
was, chains in flight included). The backing is not saved: a disk is its
file, which the restore is given again (its capacity is checked), and a
console's output goes wherever the restored run sends it; console input
still waiting is kept.

A record comes from a file or a network stream: every field is checked
for type and range, and a ring that is not guest RAM in the restored VM is
refused, before anything is applied.
"""

from __future__ import annotations

from mpvmm.errors import StateError
from mpvmm.virtio import spec
from mpvmm.virtio.mmio import MmioTransport
from mpvmm.virtio.queue import SplitQueue

STATE_VERSION = 1
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
TRANSPORT_FIELDS = {"status": _U32, "driver_features": _U64, "interrupt_status": _U32, "raised_since_read": _U32,
                    "config_generation": _U32,
                    "device_features_sel": _U32, "driver_features_sel": _U32, "queue_sel": _U32}
QUEUE_FIELDS = {"size": spec.QUEUE_SIZE_LIMIT, "desc_table": _U64, "avail_ring": _U64, "used_ring": _U64,
                "next_avail": 0xFFFF, "next_used": 0xFFFF, "signalled_used": 0xFFFF, "unchecked_used": 0xFFFF}
QUEUE_FLAGS = ("ready", "attached", "kicks_suppressed")


def capture(transport: MmioTransport) -> dict:
    """The record of ``transport`` and its device now (the owner serves nothing meanwhile)."""
    return {"version": STATE_VERSION, "device_id": transport.device.device_id,
            **transport.registers_state(), "unofferable_features": transport.unofferable_features,
            "needs_reset_reason": transport.needs_reset_reason,
            "queues": [queue.state() for queue in transport.queues], "device": transport.device.state()}


def restore(transport: MmioTransport, record: object) -> None:
    """Apply ``capture``'s record to a freshly built ``transport``; StateError for any bad field."""
    if not isinstance(record, dict) or record.get("version") != STATE_VERSION:
        raise StateError(f"not a version {STATE_VERSION} virtio device record")
    if record.get("device_id") != transport.device.device_id:
        raise StateError(f"the record is of device type {record.get('device_id')!r:.20}, "
                         f"this device is type {transport.device.device_id}")
    fields = {name: _number(record, name, limit) for name, limit in TRANSPORT_FIELDS.items()}
    reason = record.get("needs_reset_reason")
    if reason is not None and not isinstance(reason, str) or not isinstance(record.get("unofferable_features"), bool):
        raise StateError("the record's needs-reset reason or feature flag is malformed")
    queues = record.get("queues")
    if not isinstance(queues, list) or len(queues) != len(transport.queues):
        raise StateError(f"the record does not have the device's {len(transport.queues)} queues")
    checked = [_queue_record(index, queue, transport) for index, queue in enumerate(queues)]
    transport.device.check_state(record.get("device"))
    # Everything is checked: from here nothing can fail half-way.
    transport.restore_registers(fields, record["unofferable_features"], reason)
    for queue, queue_record in zip(transport.queues, checked):
        queue.restore(queue_record, transport.memory, transport.driver_features)
    transport.device.restore_state(record["device"])
    if transport.running:
        transport.device.activate(transport.memory, transport.queues, transport.driver_features)


def _number(record: dict, name: str, limit: int) -> int:
    value = record.get(name)
    if type(value) is not int or not 0 <= value <= limit:
        raise StateError(f"the record's {name} {value!r:.20} is not an integer from 0 to {limit}")
    return value


def _queue_record(index: int, record: object, transport: MmioTransport) -> dict:
    """Queue ``index``'s record, checked; an attached ring must lie in this VM's RAM as it did in the saved one."""
    if not isinstance(record, dict):
        raise StateError(f"queue {index}'s record is not a map")
    for name, limit in QUEUE_FIELDS.items():
        _number(record, name, limit)
    for name in QUEUE_FLAGS:
        if not isinstance(record.get(name), bool):
            raise StateError(f"queue {index}'s {name} is not a boolean")
    if record["attached"]:
        trial = SplitQueue(transport.queues[index].max_size)
        trial.size, trial.desc_table = record["size"], record["desc_table"]
        trial.avail_ring, trial.used_ring = record["avail_ring"], record["used_ring"]
        problem = trial.layout_error(transport.memory)
        if problem:
            raise StateError(f"saved queue {index} does not fit this VM: {problem}")
    return record
