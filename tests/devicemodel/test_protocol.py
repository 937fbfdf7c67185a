import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpvmm.devicemodel.protocol import (
    KIND_READ,
    KIND_WRITE,
    KIND_WRITE_ACKED,
    KINDS,
    MAX_MESSAGE_SIZE,
    REJECT_REASONS,
    SCHEMA_VERSION,
    SPACE_MMIO,
    SPACE_PIO,
    UINT64_MAX,
    VALID_SIZES,
    MessageRejected,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from mpvmm.errors import MpvmmError, ProtocolError

GOOD = [SCHEMA_VERSION, KIND_WRITE, 0, SPACE_PIO, 0x3F8, 1, 0x41, 0]


def packed(**changes):
    fields = dict(zip(["version", "kind", "vcpu", "space", "address", "size", "value", "seq"], GOOD))
    fields.update(changes)
    return msgpack.packb(list(fields.values()))


def test_constants():
    assert SCHEMA_VERSION == 1 and MAX_MESSAGE_SIZE == 128
    assert (KIND_WRITE, KIND_READ, KIND_WRITE_ACKED, SPACE_PIO, SPACE_MMIO) == (0, 1, 2, 0, 1)
    assert KINDS == (KIND_WRITE, KIND_READ, KIND_WRITE_ACKED)


def test_wire_format_is_the_compact_one_the_c_loop_writes():
    # fixarray(8), fixints, uint16 port, fixint size/value/seq
    expected = bytes.fromhex("98" "01" "00" "00" "00" "cd03f8" "01" "41" "00")
    assert encode_request(KIND_WRITE, 0, SPACE_PIO, 0x3F8, 1, 0x41, 0) == expected
    big = encode_request(KIND_READ, UINT64_MAX, SPACE_MMIO, UINT64_MAX, 8, 0, UINT64_MAX)
    assert len(big) == 1 + 1 + 1 + 9 + 1 + 9 + 1 + 1 + 9 <= MAX_MESSAGE_SIZE
    assert encode_reply(7, 0x5A) == bytes.fromhex("9301075a")


def test_decode_good_request():
    request = decode_request(packed(kind=KIND_READ, seq=9, value=0))
    assert request == Request(KIND_READ, 0, SPACE_PIO, 0x3F8, 1, 0, 9)
    assert request.is_read
    assert decode_request(bytearray(packed())) == decode_request(memoryview(packed()))


TOO_WIDE = 1 << 64
REJECTIONS = [
    ("not_bytes", "a string"),
    ("not_bytes", None),
    ("not_bytes", list(GOOD)),
    ("too_large", bytes(MAX_MESSAGE_SIZE + 1)),
    ("truncated", b""),
    ("truncated", packed()[:-1]),
    ("truncated", b"\x98"),
    ("truncated", b"\xdd\xff\xff\xff\xff"),  # array header claiming 2**32 items
    ("malformed", b"\xc1"),  # the one reserved msgpack byte
    ("trailing_bytes", packed() + b"\x00"),
    ("trailing_bytes", packed() + packed()),
    ("not_array", msgpack.packb({"op": 1})),
    ("not_array", msgpack.packb(1)),
    ("not_array", msgpack.packb(b"\x98")),
    ("bad_length", msgpack.packb([])),
    ("bad_length", msgpack.packb([1, 0, 0])),
    ("bad_length", msgpack.packb(GOOD + [0])),
    ("bad_version", packed(version=2)),
    ("bad_version", packed(version=0)),
    ("bad_version", msgpack.packb([2, 0, 0])),  # a future layout is a version error
    ("not_int", packed(version=True)),
    ("not_int", packed(kind=False)),
    ("not_int", packed(address=1.0)),
    ("not_int", packed(value="A")),
    ("not_int", packed(seq=None)),
    ("not_int", packed(vcpu=[0])),
    ("negative_field", packed(vcpu=-1)),
    ("negative_field", packed(version=-1)),
    ("negative_field", packed(seq=-(1 << 63))),
    ("bad_kind", packed(kind=3)),
    ("bad_space", packed(space=2)),
    ("bad_size", packed(size=0)),
    ("bad_size", packed(size=3)),
    ("bad_size", packed(size=16)),
    ("value_too_wide", packed(size=1, value=0x100)),
    ("value_too_wide", packed(size=4, value=1 << 32)),
    ("address_out_of_range", packed(space=SPACE_PIO, address=0x10000)),
]


@pytest.mark.parametrize("reason, data", REJECTIONS)
def test_every_rejection_reason(reason, data):
    with pytest.raises(MessageRejected) as info:
        decode_request(data)
    assert info.value.reason == reason
    assert info.value.reason in REJECT_REASONS
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, MpvmmError)


def test_rejection_table_covers_every_reason():
    # field_too_wide cannot come out of msgpack (it stops at 2**64-1); the
    # encoder's checks reach it.
    assert {reason for reason, _ in REJECTIONS} | {"field_too_wide"} == set(REJECT_REASONS)
    with pytest.raises(MessageRejected) as info:
        encode_request(KIND_WRITE, 0, SPACE_MMIO, 0, 8, 0, TOO_WIDE)
    assert info.value.reason == "field_too_wide"


def test_mmio_addresses_use_the_whole_64_bits():
    assert decode_request(packed(space=SPACE_MMIO, address=UINT64_MAX)).address == UINT64_MAX


def test_deep_nesting_is_refused_without_recursion_trouble():
    with pytest.raises(MessageRejected):
        decode_request(b"\x91" * (MAX_MESSAGE_SIZE - 1) + b"\x00")
    with pytest.raises(MessageRejected):
        decode_request(b"\x91" * 100000)


@pytest.mark.parametrize(
    "args",
    [
        (3, 0, 0, 0, 1, 0, 0),
        (0, 0, 2, 0, 1, 0, 0),
        (0, 0, 0, 0, 5, 0, 0),
        (0, 0, 0, 0, 1, 256, 0),
        (0, -1, 0, 0, 1, 0, 0),
        (0, 0, 0, 0x10000, 1, 0, 0),
        (0, 0, 0, 0, 1, True, 0),
    ],
)
def test_encode_request_refuses_what_decode_would(args):
    with pytest.raises(MessageRejected):
        encode_request(*args)


def test_reply_round_trip_and_rejections():
    assert decode_reply(encode_reply(3, UINT64_MAX)) == (3, UINT64_MAX)
    assert decode_reply(encode_reply(0, 0)) == (0, 0)
    for bad, reason in [
        (msgpack.packb([1, 2]), "bad_length"),
        (msgpack.packb([2, 0, 0]), "bad_version"),
        (msgpack.packb([1, -1, 0]), "negative_field"),
        (msgpack.packb([1, 0, "x"]), "not_int"),
        (encode_reply(1, 1) + b"\x00", "trailing_bytes"),
    ]:
        with pytest.raises(MessageRejected) as info:
            decode_reply(bad)
        assert info.value.reason == reason
    with pytest.raises(ProtocolError):
        encode_reply(-1, 0)
    with pytest.raises(ProtocolError):
        encode_reply(0, TOO_WIDE)


# --- Properties. ---

uint64 = st.integers(0, UINT64_MAX)


@st.composite
def valid_requests(draw):
    space = draw(st.sampled_from([SPACE_PIO, SPACE_MMIO]))
    size = draw(st.sampled_from(VALID_SIZES))
    return Request(
        kind=draw(st.sampled_from(KINDS)),
        vcpu=draw(uint64),
        space=space,
        address=draw(st.integers(0, 0xFFFF) if space == SPACE_PIO else uint64),
        size=size,
        value=draw(st.integers(0, (1 << (8 * size)) - 1)),
        seq=draw(uint64),
    )


@given(valid_requests())
def test_round_trip_for_all_valid_fields(req):
    data = encode_request(*req)
    assert len(data) <= MAX_MESSAGE_SIZE
    assert decode_request(data) == req


@given(uint64, uint64)
def test_reply_round_trip(seq, value):
    assert decode_reply(encode_reply(seq, value)) == (seq, value)


def only_protocol_errors(data):
    try:
        result = decode_request(data)
    except ProtocolError:
        return
    assert isinstance(result, Request)


@settings(max_examples=500)
@given(st.binary(max_size=MAX_MESSAGE_SIZE + 8))
def test_arbitrary_bytes_only_raise_protocol_error(data):
    only_protocol_errors(data)


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_after_a_valid_prefix(tail):
    only_protocol_errors(packed()[:6] + tail)
    only_protocol_errors(b"\x98\x01" + tail)


msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), UINT64_MAX)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
msgpack_objects = st.recursive(
    msgpack_scalars,
    lambda children: st.lists(children, max_size=10)
    | st.dictionaries(st.text(max_size=5) | st.integers(0, 10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=500)
@given(msgpack_objects)
def test_arbitrary_msgpack_objects_only_raise_protocol_error(obj):
    only_protocol_errors(msgpack.packb(obj))


@settings(max_examples=500)
@given(
    st.lists(
        st.integers(-(1 << 63), UINT64_MAX) | st.sampled_from([0, 1, 2, 4, 8]), min_size=7, max_size=9
    )
)
def test_near_valid_arrays_only_raise_protocol_error(items):
    only_protocol_errors(msgpack.packb([SCHEMA_VERSION] + items))


@given(st.binary(max_size=MAX_MESSAGE_SIZE))
def test_decode_reply_only_raises_protocol_error(data):
    try:
        decode_reply(data)
    except ProtocolError:
        pass
