"""Total msgpack decoding: any input either decodes to the expected shape or raises DecodeError."""

from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE = 16 * 1024 * 1024


class DecodeError(ValueError):
    """Input that is not what the protocol allows. ``kind`` labels the metric that counts it."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, kind: str, *, most: int = -1) -> Any:
    """Decode one msgpack object with hard limits; anything malformed becomes DecodeError(kind). ``most``: no array
    may hold more items (refused at its header, before they are read)."""
    if len(data) > MAX_MESSAGE:
        raise DecodeError(kind, f"{len(data)} bytes is over the {MAX_MESSAGE}-byte limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, max_array_len=most)
    except Exception as exc:  # msgpack raises several exception types on hostile input
        raise DecodeError(kind, f"malformed msgpack ({exc.__class__.__name__})") from None


def expect(value: Any, typ: type | tuple[type, ...], kind: str, what: str) -> Any:
    """Check one decoded field's type; bool is not accepted where an int is expected."""
    if type(value) is typ:  # the common case, decided at once (a bool's type is not int)
        return value
    if isinstance(value, bool) and typ is int:
        raise DecodeError(kind, f"{what}: expected int, got bool")
    if not isinstance(value, typ):
        raise DecodeError(kind, f"{what}: expected {getattr(typ, '__name__', typ)}, got {type(value).__name__}")
    return value


def expect_uint(value: Any, bits: int, kind: str, what: str) -> int:
    if type(value) is int and 0 <= value < 1 << bits:
        return value
    expect(value, int, kind, what)
    if value < 0 or value >= 1 << bits:
        raise DecodeError(kind, f"{what}: {value} is out of range")
    return value


def field(msg: dict, key: str, typ: type | tuple[type, ...], kind: str) -> Any:
    if key not in msg:
        raise DecodeError(kind, f"missing field {key!r}")
    return expect(msg[key], typ, kind, key)
