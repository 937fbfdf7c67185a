import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvmm.devicemodel.bus import Bus, BusError, BusRange
from mpvmm.devicemodel.devices import TestDevice, testdev_pattern
from mpvmm.devicemodel.machine import (
    COM1_NAME,
    MMIO_TESTDEV_NAME,
    PCI_CONFIG_NAME,
    PCI_CONFIG_PORT,
    PIO_TESTDEV_NAME,
    PORT80_NAME,
    POST_DIAGNOSTIC_PORT,
    DeviceModel,
    build_buses,
)
from mpvmm.devicemodel.protocol import (
    KIND_READ,
    KIND_WRITE,
    KIND_WRITE_ACKED,
    SPACE_MMIO,
    SPACE_PIO,
    Request,
    decode_reply,
    encode_request,
)
from mpvmm.x86.layout import (COM1_PORT, MMIO_TESTDEV_ADDR, MMIO_TESTDEV_DOORBELL_ADDR, NULL_PORT,
                              PIO_TESTDEV_DOORBELL_PORT, PIO_TESTDEV_PORT)
from tests.devicemodel.test_protocol import valid_requests


def write(space, address, size, value):
    return Request(KIND_WRITE, 0, space, address, size, value, 0)


def read(space, address, size, seq=0):
    return Request(KIND_READ, 0, space, address, size, 0, seq)


def test_machine_map():
    pio, mmio, devices = build_buses()
    assert pio.lookup(COM1_PORT)[1] == COM1_NAME
    assert pio.lookup(COM1_PORT + 7)[1:] == (COM1_NAME, 7)
    assert pio.lookup(PIO_TESTDEV_PORT + 3)[1:] == (PIO_TESTDEV_NAME, 3)
    assert pio.lookup(POST_DIAGNOSTIC_PORT)[1] == PORT80_NAME
    assert pio.lookup(PCI_CONFIG_PORT + 4)[1] == PCI_CONFIG_NAME  # 0xCFC
    assert pio.lookup(0xCFF)[1] == PCI_CONFIG_NAME
    assert pio.lookup(0xD00) is None
    assert mmio.lookup(MMIO_TESTDEV_ADDR + 0x10)[1:] == (MMIO_TESTDEV_NAME, 0x10)
    assert pio.lookup(NULL_PORT) is None  # the run loop's, never ours
    assert devices[PIO_TESTDEV_NAME] is not devices[MMIO_TESTDEV_NAME]


def test_uart_writes_reach_the_console():
    out = []
    model = DeviceModel(console_out=out.append)
    for byte in b"hi\n":
        assert model.handle(write(SPACE_PIO, COM1_PORT, 1, byte)) is None
    assert b"".join(out) == b"hi\n"
    stats = model.stats()
    assert stats["requests"][COM1_NAME] == {"read": 0, "write": 3}
    assert stats["devices"][COM1_NAME]["out_bytes"] == 3


def test_testdev_on_both_buses():
    model = DeviceModel()
    assert model.handle(read(SPACE_PIO, PIO_TESTDEV_PORT + 2, 2)) == testdev_pattern(2, 2)
    assert model.handle(read(SPACE_MMIO, MMIO_TESTDEV_ADDR + 8, 8)) == testdev_pattern(8, 8)
    model.handle(write(SPACE_PIO, PIO_TESTDEV_PORT, 4, 5))
    model.handle(write(SPACE_PIO, PIO_TESTDEV_PORT, 1, 7))
    model.handle(write(SPACE_MMIO, MMIO_TESTDEV_ADDR, 8, 100))
    devices = model.stats()["devices"]
    counts = ("writes", "write_sum", "reads")
    assert {k: devices[PIO_TESTDEV_NAME][k] for k in counts} == {"writes": 2, "write_sum": 12, "reads": 1}
    assert {k: devices[MMIO_TESTDEV_NAME][k] for k in counts} == {"writes": 1, "write_sum": 100, "reads": 1}


def test_an_acknowledged_write_is_a_write_answered_with_zero():
    model = DeviceModel()
    acked = Request(KIND_WRITE_ACKED, 0, SPACE_PIO, PIO_TESTDEV_PORT, 4, 9, 5)
    assert decode_reply(model.handle_message(encode_request(*acked))) == (5, 0)
    assert model.handle(Request(KIND_WRITE_ACKED, 0, SPACE_PIO, 0x2F8, 1, 1, 6)) == 0  # unmapped: still answered
    stats = model.stats()
    assert stats["devices"][PIO_TESTDEV_NAME]["write_sum"] == 9
    assert stats["requests"][PIO_TESTDEV_NAME]["write"] == 1 and stats["unmapped"]["pio"]["write"] == 1


def test_coalesced_writes_and_doorbells_reach_devices_and_are_counted_apart():
    model = DeviceModel()
    model.write_coalesced(SPACE_PIO, PIO_TESTDEV_PORT, 4, 3)
    model.write_coalesced(SPACE_MMIO, MMIO_TESTDEV_ADDR + 16, 8, (1 << 64) + 4)  # masked to the width
    model.write_coalesced(SPACE_MMIO, 0x1000, 8, 1)  # nothing there: unmapped, never raised
    model.doorbell(SPACE_PIO, PIO_TESTDEV_DOORBELL_PORT, 3)
    model.doorbell(SPACE_MMIO, MMIO_TESTDEV_DOORBELL_ADDR, 2)
    stats = model.stats()
    assert stats["coalesced"][PIO_TESTDEV_NAME] == 1 and stats["coalesced"][MMIO_TESTDEV_NAME] == 1
    assert stats["devices"][PIO_TESTDEV_NAME]["write_sum"] == 3
    assert stats["devices"][MMIO_TESTDEV_NAME]["write_sum"] == 4
    assert stats["doorbells"] == {**dict.fromkeys(stats["doorbells"], 0), PIO_TESTDEV_NAME: 3, MMIO_TESTDEV_NAME: 2}
    assert stats["devices"][PIO_TESTDEV_NAME]["doorbells"] == 3
    assert stats["requests"][PIO_TESTDEV_NAME] == {"read": 0, "write": 0}  # none of it was a request
    assert stats["unmapped"]["mmio"]["write"] == 1


@pytest.mark.parametrize("size, ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF), (8, (1 << 64) - 1)])
def test_unmapped_reads_are_all_ones_and_counted(size, ones):
    model = DeviceModel()
    assert model.handle(read(SPACE_PIO, 0x2F8, size)) == ones
    assert model.handle(read(SPACE_MMIO, 0x1000, size)) == ones
    assert model.handle(write(SPACE_MMIO, 0x1000, size, 1)) is None
    unmapped = model.stats()["unmapped"]
    assert unmapped == {"pio": {"read": 1, "write": 0}, "mmio": {"read": 1, "write": 1}}


def test_pci_config_sink_says_no_device():
    model = DeviceModel()
    model.handle(write(SPACE_PIO, 0xCF8, 4, 0x80000000))
    assert model.handle(read(SPACE_PIO, 0xCF8, 4)) == 0xFFFFFFFF  # type-1 probe fails
    assert model.handle(read(SPACE_PIO, 0xCFC, 2)) == 0xFFFF  # vendor id: none
    model.handle(write(SPACE_PIO, POST_DIAGNOSTIC_PORT, 1, 0))
    stats = model.stats()
    assert stats["unmapped"]["pio"] == {"read": 0, "write": 0}
    assert stats["devices"][PCI_CONFIG_NAME] == {"reads": 2, "writes": 1}
    assert stats["devices"][PORT80_NAME] == {"reads": 0, "writes": 1}


def test_handle_message_replies_only_to_reads_and_counts_rejects():
    model = DeviceModel()
    reply = model.handle_message(encode_request(KIND_READ, 3, SPACE_PIO, PIO_TESTDEV_PORT, 1, 0, 42))
    assert decode_reply(reply) == (42, testdev_pattern(0, 1))
    assert model.handle_message(encode_request(KIND_WRITE, 3, SPACE_PIO, PIO_TESTDEV_PORT, 1, 1, 42)) is None
    assert model.handle_message(b"\xc1") is None
    assert model.handle_message(msgpack.packb([2, 0, 0, 0, 0, 1, 0, 0])) is None
    assert model.handle_message(msgpack.packb([2, 0, 0, 0, 0, 1, 0, 0])) is None
    rejected = model.stats()["rejected"]
    assert rejected["malformed"] == 1 and rejected["bad_version"] == 2
    assert sum(rejected.values()) == 3


class Broken(TestDevice):
    def read(self, offset, size):
        raise RuntimeError("device bug")

    def write(self, offset, size, value):
        raise RuntimeError("device bug")


class Wide(TestDevice):
    def read(self, offset, size):
        return 1 << 70  # wider than any access


def model_with(space, base, device):
    pio, mmio = Bus("pio"), Bus("mmio")
    (pio if space == SPACE_PIO else mmio).insert(BusRange(base, 8), device, "odd")
    return DeviceModel(machine=(pio, mmio, {"odd": device}))


def test_device_failures_are_contained():
    model = model_with(SPACE_PIO, PIO_TESTDEV_PORT, Broken())
    assert model.handle(read(SPACE_PIO, PIO_TESTDEV_PORT, 2)) == 0xFFFF
    assert model.handle(write(SPACE_PIO, PIO_TESTDEV_PORT, 2, 1)) is None
    assert model.stats()["device_errors"]["odd"] == 2
    assert model.stats()["requests"]["odd"] == {"read": 1, "write": 1}


def test_device_values_are_masked_to_the_access_width():
    model = model_with(SPACE_MMIO, MMIO_TESTDEV_ADDR, Wide())
    reply = model.handle_message(encode_request(KIND_READ, 0, SPACE_MMIO, MMIO_TESTDEV_ADDR, 8, 0, 1))
    assert decode_reply(reply) == (1, 0)


def test_stats_are_msgpack_packable_with_string_keys():
    model = DeviceModel()
    model.handle(write(SPACE_MMIO, MMIO_TESTDEV_ADDR, 8, (1 << 64) - 1))
    model.handle(write(SPACE_MMIO, MMIO_TESTDEV_ADDR, 8, (1 << 64) - 1))
    stats = model.stats()
    assert msgpack.unpackb(msgpack.packb(stats)) == stats


def test_overlapping_machine_is_refused():
    pio, _, _ = build_buses()
    with pytest.raises(BusError):
        pio.insert(BusRange(COM1_PORT + 4, 1), object(), "clash")


# --- Nothing a guest sends can break the model. ---


@settings(max_examples=300)
@given(valid_requests())
def test_any_valid_request_is_handled(req):
    model = DeviceModel(console_out=lambda data: None)
    reply = model.handle_message(encode_request(*req))
    if req.kind == KIND_READ:
        seq, value = decode_reply(reply)
        assert seq == req.seq and value < (1 << (8 * req.size))
    elif req.kind == KIND_WRITE_ACKED:
        assert decode_reply(reply) == (req.seq, 0)
    else:
        assert reply is None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_any_bytes_are_handled_or_counted(data):
    model = DeviceModel()
    model.handle_message(data)
    stats = model.stats()
    handled = sum(sum(ops.values()) for ops in stats["requests"].values())
    unmapped = sum(sum(ops.values()) for ops in stats["unmapped"].values())
    assert handled + unmapped + sum(stats["rejected"].values()) == 1
