"""The frame codec: exact round trips, zero-copy reads, and clear refusals. No pickle."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from cvserve.brokers import MalformedMessage, Message, decode_frame, encode_frame
from cvserve.brokers.codec import ALIGN, MAGIC

DTYPES = ["|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8",
          "<c8", "<c16", "|b1", ">f4", ">i8"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (1, 0, 3)])
def test_every_dtype_and_shape_round_trips_bit_for_bit(dtype, shape):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    arr = raw.view(dtype).reshape(shape)  # arbitrary bits: NaN payloads, denormals, ...
    out = decode_frame(encode_frame(Message("r", arrays={"a": arr}))).arrays["a"]
    assert out.dtype == arr.dtype and out.dtype.str == dtype
    assert out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


def test_fields_headers_and_several_arrays_survive():
    arrays = {
        "crop": np.arange(48 * 320 * 3, dtype=np.uint8).reshape(48, 320, 3),
        "strided": np.arange(24.0).reshape(4, 6)[:, ::2],  # not contiguous
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "scalar": np.float32(2.5),
    }
    headers = {"s": "ü-text", "i": -(2**53), "f": 0.1, "t": True, "z": 0}
    msg = Message("req", index=7, headers=headers, arrays=arrays, reply_to="rep", id="abc")
    out = decode_frame(encode_frame(msg, published_at=1234.5678))
    assert (out.request_id, out.index, out.reply_to, out.id) == ("req", 7, "rep", "abc")
    assert out.published_at == 1234.5678
    assert out.headers == headers and type(out.headers["t"]) is bool
    assert list(out.arrays) == list(arrays)
    for name, want in arrays.items():
        assert np.array_equal(out.arrays[name], want) and out.arrays[name].shape == np.shape(want)
    assert out.arrays["scalar"].shape == () and out.arrays["scalar"].dtype == np.float32


def test_decoded_arrays_are_aligned_read_only_views_of_the_frame():
    frame = encode_frame(Message("r", arrays={"a": np.arange(3, dtype=np.uint8),
                                        "b": np.arange(5, dtype=np.float64)}))  # fmt: skip
    out = decode_frame(frame)
    for arr in out.arrays.values():
        assert not arr.flags.writeable
        assert not arr.flags.owndata  # a view: no copy was made
        offset = arr.__array_interface__["data"][0] - np.frombuffer(frame, np.uint8).ctypes.data
        assert offset % ALIGN == 0
    assert len(frame) % ALIGN == 0


def test_frame_is_not_pickle_and_header_is_plain_json():
    frame = encode_frame(Message("r", headers={"k": 1}, arrays={"a": np.zeros(2)}))
    assert frame[:4] == MAGIC
    assert b"\x80\x04" not in frame[:2]
    hlen = int.from_bytes(frame[4:8], "little")
    head = json.loads(frame[8 : 8 + hlen])
    assert head["rid"] == "r" and head["a"] == [["a", "<f8", [2]]]
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(frame)


@pytest.mark.parametrize(
    "value",
    [np.array([object()], dtype=object), np.array(["text"]), np.zeros(2, "i4,f4"),
     np.array([b"x"]), np.zeros(2, "datetime64[s]"), [1, 2, 3]],
    ids=["object", "unicode", "structured", "bytes", "datetime", "list"],
)  # fmt: skip
def test_arrays_that_cannot_travel_are_refused(value):
    with pytest.raises(MalformedMessage):
        encode_frame(Message("r", arrays={"a": value}))


@pytest.mark.parametrize(
    "headers",
    [{"a": None}, {"a": [1]}, {"a": {"b": 1}}, {"a": float("nan")}, {"a": float("inf")},
     {1: "x"}],
)  # fmt: skip
def test_headers_that_cannot_travel_are_refused(headers):
    with pytest.raises(MalformedMessage):
        encode_frame(Message("r", headers=headers))


def _frame(head: dict, data: bytes = b"") -> bytes:
    header = json.dumps(head).encode()
    start = 8 + len(header)
    pad = bytes(-start % ALIGN)
    return MAGIC + len(header).to_bytes(4, "little") + header + pad + data


GOOD_HEAD = {"id": "x", "rid": "r", "i": 0, "to": "", "t": 1.0, "h": {}, "a": []}


def _good_frame() -> bytes:
    return encode_frame(Message("r", arrays={"a": np.arange(4, dtype=np.int32)}))


@pytest.mark.parametrize(
    "frame, says",
    [
        (b"", "bad magic"),
        (b"PK\x03\x04" + bytes(20), "bad magic"),
        (pickle.dumps({"a": 1}), "bad magic"),
        (MAGIC + (10**6).to_bytes(4, "little") + b"{}", "does not fit"),
        (MAGIC + (3).to_bytes(4, "little") + b"{x}", "not JSON"),
        (MAGIC + (2).to_bytes(4, "little") + b"[]", "not a JSON object"),
        (_frame({**GOOD_HEAD, "rid": 5}), "'rid'"),
        (_frame({**GOOD_HEAD, "i": True}), "'i'"),
        (_frame({**GOOD_HEAD, "t": "now"}), "'t'"),
        (_frame({**GOOD_HEAD, "h": {"k": [1]}}), "header 'k'"),
        (_frame({**GOOD_HEAD, "a": [["x", "|O", [1]]]}, bytes(16)), "cannot travel"),
        (_frame({**GOOD_HEAD, "a": [["x", "float32", [1]]]}, bytes(16)), "unknown dtype"),
        (_frame({**GOOD_HEAD, "a": [["x", "<q9", [1]]]}, bytes(16)), "unknown dtype"),
        (_frame({**GOOD_HEAD, "a": [["x", "<f4", [-1]]]}), "bad shape"),
        (_frame({**GOOD_HEAD, "a": [["x", "<f4", [1.5]]]}), "bad shape"),
        (_frame({**GOOD_HEAD, "a": [["x", "<f4", [10**12]]]}), "needs"),
        (_frame({**GOOD_HEAD, "a": [["x", "<f4", [2]], ["x", "<f4", [2]]]}, bytes(32)), "twice"),
        (_frame({**GOOD_HEAD, "a": [["x", "<f4", [2]]]}, bytes(4)), "needs"),
        (_good_frame()[:-1], "needs"),
        (_good_frame() + bytes(16), "frame is"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_frames_are_rejected_clearly(frame, says):
    with pytest.raises(MalformedMessage, match=says):
        decode_frame(frame)


def test_malformed_message_is_a_value_error():
    with pytest.raises(ValueError):
        decode_frame(b"junk")
