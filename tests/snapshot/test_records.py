"""The record framing shared by snapshot state files and migration streams, as a pure format."""

import struct

import msgpack
import pytest

from mpvmm.errors import StateError
from mpvmm.snapshot import records


def test_a_message_round_trips():
    data = records.pack(records.MACHINE, {"cpus": 2, "blob": b"\x00\xff"})
    assert records.parse(data) == [(records.MACHINE, {"cpus": 2, "blob": b"\x00\xff"})]


def test_header_is_kind_flags_length_and_crc():
    payload = msgpack.packb({"a": 1})
    data = records.pack(records.END, {"a": 1})
    kind, flags, length, checksum = struct.unpack_from("<HHII", data)
    assert (kind, flags, length) == (records.END, 0, len(payload))
    assert checksum == records.crc32(payload)
    assert data[12:] == payload


def test_pages_payloads_stay_bytes():
    payload = records.PAGE_OFFSET.pack(0x2000) + b"\x01" * 4096
    assert records.parse(records.encode(records.PAGES, payload)) == [(records.PAGES, payload)]


def test_several_records_come_back_in_order():
    data = b"".join(records.pack(kind, {"n": n}) for n, kind in enumerate((records.SNAPSHOT, records.VCPU, records.END)))
    assert [(kind, message["n"]) for kind, message in records.parse(data)] == [
        (records.SNAPSHOT, 0), (records.VCPU, 1), (records.END, 2)]


@pytest.mark.parametrize("cut", [1, 11, 12, 15])
def test_a_truncated_record_is_refused(cut):
    data = records.pack(records.VM, {"pit": b"x" * 8})
    with pytest.raises(StateError, match="truncated"):
        records.parse(data[: len(data) - cut] if cut > 11 else data[:cut])


def test_a_flipped_byte_fails_the_checksum():
    data = bytearray(records.pack(records.VCPU, {"regs": b"\x00" * 144}))
    data[-5] ^= 0x40
    with pytest.raises(StateError, match="checksum"):
        records.parse(bytes(data))


@pytest.mark.parametrize("kind, flags", [(999, 0), (records.VCPU, 1)])
def test_unknown_kinds_and_flags_are_refused(kind, flags):
    payload = msgpack.packb({})
    data = struct.pack("<HHII", kind, flags, len(payload), records.crc32(payload)) + payload
    with pytest.raises(StateError, match="unknown kind"):
        records.parse(data)


def test_an_impossible_length_is_refused_before_reading():
    data = struct.pack("<HHII", records.VCPU, 0, records.MAX_MESSAGE_PAYLOAD + 1, 0)
    with pytest.raises(StateError, match="more than such a record can hold"):
        records.decode_header(data)
    assert records.decode_header(struct.pack("<HHII", records.PAGES, 0, records.MAX_PAGES_PAYLOAD, 0))[1] == \
        records.MAX_PAGES_PAYLOAD


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(7)])
def test_a_message_must_be_a_msgpack_map(payload):
    with pytest.raises(StateError, match="not msgpack|not a map"):
        records.parse(records.encode(records.MACHINE, payload))
