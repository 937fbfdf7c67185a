"""The vCPU <-> device-model message schema (docs/protocol.md, version 1).

A request is a msgpack array of 8 unsigned integers
``[version, kind, vcpu, space, address, size, value, seq]``; a reply is
``[version, seq, value]``. The C run loop encodes requests the same way, so
this module is the reference both sides are tested against.

Requests come from the guest's side of the machine: ``decode_request`` treats
them as hostile and turns anything malformed into ``MessageRejected`` (a
``ProtocolError``) whose ``reason`` is a short metric label. It never raises
anything else.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from mpvmm.errors import ProtocolError

SCHEMA_VERSION = 1
# Queue message size: an 8-item request of uint64s is at most 73 bytes.
MAX_MESSAGE_SIZE = 128

KIND_WRITE = 0  # posted: no reply, the vCPU has already resumed
KIND_READ = 1  # sync: exactly one reply, the vCPU waits for it
KIND_WRITE_ACKED = 2  # a write the vCPU waits for (a coalesced ring's overflow): one reply, value 0
KINDS = (KIND_WRITE, KIND_READ, KIND_WRITE_ACKED)
SPACE_PIO = 0  # port I/O; address is a port number
SPACE_MMIO = 1  # MMIO; address is guest-physical
VALID_SIZES = (1, 2, 4, 8)

REQUEST_FIELDS = 8
REPLY_FIELDS = 3
UINT64_MAX = (1 << 64) - 1
PIO_PORT_MAX = 0xFFFF

# Every reason decode_request can give, so metrics can show zeros up front.
REJECT_REASONS = (
    "not_bytes",  # not a bytes-like object at all
    "too_large",  # longer than MAX_MESSAGE_SIZE
    "truncated",  # msgpack input ends inside an object
    "malformed",  # not msgpack (reserved byte, bad ext, nesting too deep...)
    "trailing_bytes",  # a complete object followed by more bytes
    "not_array",  # valid msgpack, but not an array
    "bad_length",  # an array with the wrong number of items
    "bad_version",  # a schema version this model does not speak
    "not_int",  # an item that is not an integer (bools, floats, strings...)
    "negative_field",  # an integer below zero
    "field_too_wide",  # an integer above 2**64 - 1
    "bad_kind",  # kind not KIND_WRITE / KIND_READ / KIND_WRITE_ACKED
    "bad_space",  # space not SPACE_PIO / SPACE_MMIO
    "bad_size",  # size not 1, 2, 4 or 8
    "value_too_wide",  # value has bits above size bytes
    "address_out_of_range",  # a port above 0xFFFF
)


class MessageRejected(ProtocolError):
    """A message broke the schema and was dropped; ``reason`` is its metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Request(NamedTuple):
    """A decoded request (the version is checked, so it is not kept)."""

    kind: int
    vcpu: int
    space: int
    address: int
    size: int
    value: int
    seq: int

    @property
    def is_read(self) -> bool:
        return self.kind == KIND_READ


def _unpack(data: bytes) -> object:
    """msgpack-decode one object, mapping every failure to a rejection."""
    try:
        # unpackb caps every container and string length at len(data) (128
        # bytes at most here), so a header claiming 2**32 items cannot make it
        # allocate; nesting is bounded by the same 128 bytes and by msgpack's
        # own stack limit (StackError). raw=True skips UTF-8 decoding of any
        # strings, which we reject anyway.
        return msgpack.unpackb(data, raw=True, use_list=True, strict_map_key=True)
    except msgpack.ExtraData as err:
        raise MessageRejected("trailing_bytes", f"{len(data)} bytes hold more than one object") from err
    except (msgpack.FormatError, msgpack.StackError) as err:
        raise MessageRejected("malformed", str(err)) from err
    except ValueError as err:
        # msgpack says "incomplete input", or "N exceeds max_array_len(len)"
        # for a header that claims more items than the bytes could hold.
        text = str(err)
        reason = "truncated" if "incomplete" in text or "exceeds" in text else "malformed"
        raise MessageRejected(reason, text) from err
    except Exception as err:  # unhashable keys, odd ext payloads: still just bad input
        raise MessageRejected("malformed", f"{type(err).__name__}: {err}") from err


def _check_uint(value: object, name: str) -> int:
    # type() rather than isinstance(): msgpack gives True/False as bool,
    # a subclass of int that must not pass for a number.
    if type(value) is not int:
        raise MessageRejected("not_int", f"{name} is {type(value).__name__}")
    if value < 0:
        raise MessageRejected("negative_field", f"{name} = {value}")
    if value > UINT64_MAX:
        raise MessageRejected("field_too_wide", f"{name} does not fit 64 bits")
    return value


def _check_request_fields(kind, vcpu, space, address, size, value, seq) -> Request:
    for field_value, name in (
        (kind, "kind"), (vcpu, "vcpu"), (space, "space"), (address, "address"),
        (size, "size"), (value, "value"), (seq, "seq"),
    ):  # fmt: skip
        _check_uint(field_value, name)
    if kind not in KINDS:
        raise MessageRejected("bad_kind", f"kind = {kind}")
    if space not in (SPACE_PIO, SPACE_MMIO):
        raise MessageRejected("bad_space", f"space = {space}")
    if size not in VALID_SIZES:
        raise MessageRejected("bad_size", f"size = {size}")
    if value >> (8 * size):
        raise MessageRejected("value_too_wide", f"value {value:#x} is wider than {size} bytes")
    if space == SPACE_PIO and address > PIO_PORT_MAX:
        raise MessageRejected("address_out_of_range", f"port {address:#x}")
    return Request(kind, vcpu, space, address, size, value, seq)


def _check_envelope(data: object, fields: int) -> list:
    """Bytes -> a list of ``fields`` items whose first is our version."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageRejected("not_bytes", type(data).__name__)
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageRejected("too_large", f"{len(data)} bytes")
    items = _unpack(data)
    if type(items) is not list:
        raise MessageRejected("not_array", type(items).__name__)
    if not items:
        raise MessageRejected("bad_length", "empty array")
    # The version decides the layout, so it is checked before the length:
    # a message from a newer schema says "bad_version", not "bad_length".
    version = _check_uint(items[0], "version")
    if version != SCHEMA_VERSION:
        raise MessageRejected("bad_version", f"version {version}, expected {SCHEMA_VERSION}")
    if len(items) != fields:
        raise MessageRejected("bad_length", f"{len(items)} items, expected {fields}")
    return items


def decode_request(data: bytes) -> Request:
    """Decode and check one request; raises MessageRejected (a ProtocolError)."""
    items = _check_envelope(data, REQUEST_FIELDS)
    return _check_request_fields(*items[1:])


def encode_request(
    kind: int, vcpu: int, space: int, address: int, size: int, value: int = 0, seq: int = 0
) -> bytes:
    """Encode a request (the Python runner's side); refuses what decode would.

    ``encode_request(*request)`` re-encodes a ``Request``.
    """
    request = _check_request_fields(kind, vcpu, space, address, size, value, seq)
    return msgpack.packb([SCHEMA_VERSION, *request])


def encode_reply(seq: int, value: int) -> bytes:
    """Encode the reply to the read whose request carried ``seq``."""
    _check_uint(seq, "seq")
    _check_uint(value, "value")
    return msgpack.packb([SCHEMA_VERSION, seq, value])


def decode_reply(data: bytes) -> tuple[int, int]:
    """Decode a reply into ``(seq, value)``; raises MessageRejected."""
    items = _check_envelope(data, REPLY_FIELDS)
    return _check_uint(items[1], "seq"), _check_uint(items[2], "value")
