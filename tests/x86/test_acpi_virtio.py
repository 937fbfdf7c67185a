"""The virtio-mmio windows in the DSDT: LNRO0005 devices with their window and GSI."""

import struct

from mpvmm.supervisor import virtio_devices
from mpvmm.x86 import acpi, aml, layout


def test_each_window_is_a_lnro0005_device_with_its_memory_and_interrupt():
    windows = virtio_devices.windows(3)
    assert windows == [(layout.VIRTIO_MMIO_BASE + i * 4096, layout.VIRTIO_FIRST_GSI + i) for i in range(3)]
    dsdt = acpi.build_dsdt(acpi.virtio_devices(windows))
    for index, (base, gsi) in enumerate(windows):
        device = aml.simple_device(f"VR{index:02X}", "LNRO0005", index,
                                   [aml.memory32_fixed(base, 4096), aml.interrupt(gsi)])
        assert device in dsdt
        assert struct.pack("<BII", 1, base, 4096) in device  # Memory32Fixed, read-write
    assert dsdt.count(b"LNRO0005") == 3


def test_slots_stay_inside_the_ioapic_and_the_mmio_hole():
    for index in range(layout.VIRTIO_MAX_DEVICES):
        base, gsi = layout.virtio_slot(index)
        assert layout.MMIO_HOLE_START <= base < layout.IOAPIC_ADDR and 16 <= gsi < 24


def test_the_layout_gives_each_window_what_the_transport_decodes():
    from mpvmm.virtio.mmio_registers import WINDOW_SIZE

    assert layout.VIRTIO_MMIO_SIZE == WINDOW_SIZE
