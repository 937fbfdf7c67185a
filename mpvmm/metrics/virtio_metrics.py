"""Metric families of the VM's virtio devices, from each device process's ``stats`` answer.

Labels: ``device`` is the device's name (``disk0``, ``console``, ``rng``),
``queue`` its queue index. Notifications are split by how they came: an
ioeventfd kick never leaves the kernel (``in_kernel``), a QueueNotify
register write that no ioeventfd took is a userspace exit (``userspace``).
The split is per device: the transport counts register notifications, each
queue counts all of its own.
"""

from __future__ import annotations

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

# Requests by operation, from the devices' own counters (block, entropy).
REQUEST_COUNTERS = {
    "block": {"reads": "read", "writes": "write", "flushes": "flush", "get_ids": "get_id",
              "discards": "discard", "write_zeroes": "write_zeroes"},
    "entropy": {"requests": "entropy"},
}
ERROR_COUNTERS = {"io_errors": "ioerr", "unsupported": "unsupp"}


def virtio_families(stats: dict[str, dict]) -> list[Metric]:
    """Families for ``VirtioDevices.stats()``: {device name: that device process's counters}."""
    if not stats:
        return []
    info = GaugeMetricFamily("mpvmm_virtio_device_info", "A virtio device and its process; always 1",
                             labels=["device", "kind", "pid"])
    notifications = CounterMetricFamily(
        "mpvmm_virtio_notifications", "Available-buffer notifications by path: in_kernel (an ioeventfd, "
        "no userspace exit) or userspace (a QueueNotify register write)", labels=["device", "path"])
    interrupts = CounterMetricFamily("mpvmm_virtio_interrupts", "Interrupts the device raised (irqfd)",
                                     labels=["device"])
    registers = CounterMetricFamily("mpvmm_virtio_register_accesses", "Register reads and writes (each a "
                                    "userspace exit forwarded by the device model)", labels=["device", "op"])
    needs_reset = CounterMetricFamily("mpvmm_virtio_needs_reset", "Times the device entered DEVICE_NEEDS_RESET",
                                      labels=["device"])
    requests = CounterMetricFamily("mpvmm_virtio_requests", "Device requests by operation", labels=["device", "op"])
    errors = CounterMetricFamily("mpvmm_virtio_request_errors", "Requests answered with an error status",
                                 labels=["device", "status"])
    families = queue_families(stats)
    for name, device in sorted(stats.items()):
        transport, kind = device["transport"], device["kind"]
        info.add_metric([name, kind, str(device["pid"])], 1)
        kicks = sum(queue["notifications"] for queue in device["queues"])
        notifications.add_metric([name, "in_kernel"], max(0, kicks - transport["mmio_notifications"]))
        notifications.add_metric([name, "userspace"], transport["mmio_notifications"])
        interrupts.add_metric([name], transport["interrupts"])
        registers.add_metric([name, "read"], transport["register_reads"])
        registers.add_metric([name, "write"], transport["register_writes"])
        needs_reset.add_metric([name], transport["needs_reset"])
        for key, op in REQUEST_COUNTERS.get(kind, {}).items():
            requests.add_metric([name, op], device["device"][key])
        for key, status in ERROR_COUNTERS.items():
            if key in device["device"]:
                errors.add_metric([name, status], device["device"][key])
    return [info, notifications, interrupts, registers, needs_reset, requests, errors, *families]


def queue_families(stats: dict[str, dict]) -> list[Metric]:
    """Per queue: notifications, chains served, bytes each way, interrupts sent and suppressed."""
    labels = ["device", "queue"]
    notifications = CounterMetricFamily("mpvmm_virtio_queue_notifications", "Available-buffer notifications "
                                        "of the queue (every path)", labels=labels)
    chains = CounterMetricFamily("mpvmm_virtio_queue_chains", "Descriptor chains the device took", labels=labels)
    data = CounterMetricFamily("mpvmm_virtio_queue_bytes", "Bytes the device read from (read) or wrote into "
                               "(written) guest buffers", labels=[*labels, "direction"])
    interrupts = CounterMetricFamily("mpvmm_virtio_queue_interrupts", "Used-buffer interrupts sent, and checks "
                                     "where the driver asked for none (suppressed)", labels=[*labels, "outcome"])
    for name, device in sorted(stats.items()):
        for index, queue in enumerate(device["queues"]):
            series = [name, str(index)]
            notifications.add_metric(series, queue["notifications"])
            chains.add_metric(series, queue["chains"])
            data.add_metric([*series, "read"], queue["bytes_read"])
            data.add_metric([*series, "written"], queue["bytes_written"])
            interrupts.add_metric([*series, "sent"], queue["interrupts"])
            interrupts.add_metric([*series, "suppressed"], queue["interrupts_suppressed"])
    return [notifications, chains, data, interrupts]
