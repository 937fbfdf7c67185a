"""A virtio device in a process of its own: ``python -m mpvmm.virtio_device <control_fd>``.

The supervisor starts one per virtio device (supervisor/virtio_devices.py);
each holds guest RAM, its backing file or console, the ioeventfds of its
queues and its irqfd, and nothing else (docs/virtio.md, "Device processes").
"""
