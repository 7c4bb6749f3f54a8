"""Message <-> bytes: a small JSON header, then each array's raw bytes. Never pickle.

Frame layout (all offsets from the frame's first byte)::

    b"CVB1" | header length (uint32, little endian) | header (UTF-8 JSON)
    | zero padding to a multiple of 16 | array 0 bytes | padding to 16 | array 1 ...

The header holds the message fields and, per array, ``[name, dtype.str, shape]``; the
dtype string carries the byte order, so arrays round-trip bit for bit. Array offsets are
not sent: they follow from the shapes, and a frame whose length differs from the one its
header implies is rejected. Decoded arrays are read-only views into the frame (no copy).
Only numeric and bool dtypes travel; object, string and structured arrays are refused.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from .errors import MalformedMessage
from .message import Message

MAGIC = b"CVB1"
ALIGN = 16
MAX_HEADER_BYTES = 1 << 20
MAX_NDIM = 32
_KINDS = frozenset("biufc")  # bool, signed, unsigned, float, complex
_PAD = bytes(ALIGN)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _check_dtype(dt: np.dtype, name: str) -> None:
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
        raise MalformedMessage(
            f"array {name!r}: dtype {dt} cannot travel (numeric and bool dtypes only)"
        )


def _checked_arrays(message: Message) -> list[tuple[str, np.ndarray]]:
    if not (
        isinstance(message.request_id, str)
        and isinstance(message.reply_to, str)
        and isinstance(message.id, str)
        and type(message.index) is int
    ):
        raise MalformedMessage("request_id, reply_to and id must be str, index an int")
    out = []
    for name, value in message.arrays.items():
        if not isinstance(name, str):
            raise MalformedMessage(f"array names must be str, got {name!r}")
        if not isinstance(value, np.ndarray | np.generic):
            raise MalformedMessage(f"array {name!r}: expected a numpy array, got {type(value)}")
        arr = np.asarray(value)
        _check_dtype(arr.dtype, name)
        out.append((name, arr))
    for key, val in message.headers.items():
        if not isinstance(key, str) or not isinstance(val, str | int | float | bool):
            raise MalformedMessage(f"header {key!r}: values must be str, int, float or bool")
        if isinstance(val, float) and not math.isfinite(val):
            raise MalformedMessage(f"header {key!r}: {val} does not travel (finite floats only)")
    return out


def validate(message: Message) -> None:
    """Raise ``MalformedMessage`` where ``encode_frame`` would: the in-process broker's check."""
    _checked_arrays(message)


def encode_frame(message: Message, published_at: float | None = None) -> bytes:
    """One frame for ``message``; ``published_at`` overrides its ``published_at``."""
    specs: list[list[Any]] = []
    blocks: list[np.ndarray] = []
    for name, arr in _checked_arrays(message):
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # keeps ndim; 0-d arrays are always contiguous
        specs.append([name, arr.dtype.str, list(arr.shape)])
        blocks.append(arr)
    head = {
        "id": message.id,
        "rid": message.request_id,
        "i": message.index,
        "to": message.reply_to,
        "t": message.published_at if published_at is None else published_at,
        "h": message.headers,
        "a": specs,
    }
    try:
        header = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise MalformedMessage(f"message header does not encode: {e}") from e
    if len(header) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header of {len(header)} bytes (limit {MAX_HEADER_BYTES})")
    start = 8 + len(header)
    parts: list[Any] = [
        MAGIC,
        len(header).to_bytes(4, "little"),
        header,
        _PAD[: _align(start) - start],
    ]
    for arr in blocks:
        raw = arr.reshape(-1).view(np.uint8)
        parts.append(raw)
        parts.append(_PAD[: _align(raw.nbytes) - raw.nbytes])
    return b"".join(parts)


def _field(head: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    val = head.get(key)
    if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
        raise MalformedMessage(f"frame header field {key!r} missing or of the wrong type")
    return val


def decode_frame(frame: bytes | bytearray | memoryview) -> Message:
    """The message in ``frame``; raises ``MalformedMessage`` on anything unexpected."""
    try:
        buf = memoryview(frame).cast("B")
    except (TypeError, ValueError) as e:
        raise MalformedMessage(f"frame is not a contiguous byte buffer: {e}") from e
    size = buf.nbytes
    if size < 8 or buf[:4] != MAGIC:
        raise MalformedMessage("not a cvserve broker frame (bad magic)")
    hlen = int.from_bytes(buf[4:8], "little")
    if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
        raise MalformedMessage(f"header length {hlen} does not fit a {size}-byte frame")
    try:
        head = json.loads(bytes(buf[8 : 8 + hlen]))
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedMessage(f"frame header is not JSON: {e}") from e
    if not isinstance(head, dict):
        raise MalformedMessage("frame header is not a JSON object")
    published = head.get("t")
    if published is not None and (
        not isinstance(published, int | float) or isinstance(published, bool)
    ):
        raise MalformedMessage("frame header field 't' is not a number")
    headers = _field(head, "h", dict)
    for key, val in headers.items():
        if not isinstance(val, str | int | float | bool):
            raise MalformedMessage(f"header {key!r} is not a str, int, float or bool")
    offset = _align(8 + hlen)
    arrays: dict[str, np.ndarray] = {}
    for spec in _field(head, "a", list):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
            raise MalformedMessage(f"bad array spec {spec!r}")
        name, dts, shape = spec
        if name in arrays:
            raise MalformedMessage(f"array {name!r} appears twice")
        try:
            dt = np.dtype(dts) if isinstance(dts, str) else None
        except TypeError:
            dt = None
        if dt is None or dt.str != dts:
            raise MalformedMessage(f"array {name!r}: unknown dtype {dts!r}")
        _check_dtype(dt, name)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise MalformedMessage(f"array {name!r}: bad shape {shape!r}")
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        if offset + nbytes > size:
            raise MalformedMessage(
                f"array {name!r} needs {nbytes} bytes at offset {offset}; frame has {size}"
            )
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=offset) if count else None
        arrays[name] = arr.reshape(shape) if arr is not None else np.empty(shape, dtype=dt)
        arrays[name].flags.writeable = False
        offset = _align(offset + nbytes)
    if offset != size:
        raise MalformedMessage(f"frame is {size} bytes; its header describes {offset}")
    return Message(
        request_id=_field(head, "rid", str),
        index=_field(head, "i", int),
        headers=headers,
        arrays=arrays,
        reply_to=_field(head, "to", str),
        id=_field(head, "id", str),
        published_at=None if published is None else float(published),
    )
