"""The v2 HTTP wire format as pure functions: any body parses or is a 400 naming its field;
what tritonclient encodes parses back to the same tensors, and what we encode tritonclient
reads back to the same arrays."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cvserve.serving.errors import BadRequest
from cvserve.serving.v2.http import encode_response, parse_request
from cvserve.serving.v2.types import DATATYPES, InferRequest, InferResponse, Tensor

th = pytest.importorskip("tritonclient.http", reason="needs the test extra (tritonclient[http])")

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_parsed(req: InferRequest) -> None:
    """What parse_request returns is internally consistent: data matches shape/datatype."""
    for t in req.inputs:
        count = math.prod(t.shape)
        if t.datatype == "BYTES":
            assert isinstance(t.data, list) and len(t.data) == count
            assert all(isinstance(x, bytes) for x in t.data)
        else:
            assert isinstance(t.data, np.ndarray)
            assert t.data.shape == tuple(t.shape)
            assert t.data.dtype == DATATYPES[t.datatype]


def _parse_or_400(body: bytes, header_length: int | None) -> None:
    try:
        req = parse_request(body, header_length)
    except BadRequest as e:
        assert str(e)  # a message, never an empty 400
        return
    _check_parsed(req)


# --- fuzzing: anything parses or is a BadRequest ------------------------------------------
@FUZZ
@given(body=st.binary(max_size=512), header=st.none() | st.integers(-8, 600))
def test_arbitrary_bytes_parse_or_400(body, header):
    _parse_or_400(body, header)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
_shapes = st.one_of(
    st.lists(st.integers(-3, 6), max_size=4),
    st.lists(st.integers(-(2**70), 2**70), max_size=20),
    _json_values,
)
_datatypes = st.sampled_from([*DATATYPES, "BF16", "FLOAT", "", None, 3])
_data = st.one_of(
    st.lists(st.integers(-300, 70000) | st.floats() | st.booleans(), max_size=30),
    st.lists(st.lists(st.integers(0, 255) | st.text(max_size=4), max_size=4), max_size=6),
    st.lists(st.text(max_size=10), max_size=8),
    _json_values,
)


def _chance(draw, p: float) -> bool:
    # hypothesis draws small integers first (and shrinks toward them): so "rarely" is high
    return draw(st.integers(0, 99)) >= 100 - round(p * 100)


def _sometimes(draw, good, bad, p_bad: float = 0.15):
    return draw(bad) if _chance(draw, p_bad) else draw(good)


_VALID_TYPES = [t for t in DATATYPES if t != "BYTES"]


@st.composite
def _near_valid_requests(draw) -> tuple[bytes, int | None]:
    """v2 requests built valid, then with each field wrong now and then."""
    inputs = []
    binary = b""
    for _ in range(draw(st.integers(0, 3))):
        datatype = _sometimes(draw, st.sampled_from([*DATATYPES]), _datatypes)
        shape = _sometimes(draw, st.lists(st.integers(0, 3), min_size=1, max_size=3), _shapes)
        ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        count = math.prod(shape) if ok and math.prod(shape) <= 64 else 1
        t: dict = {
            "name": _sometimes(
                draw,
                st.sampled_from(["IMAGE", "pixel_values", "x"]),
                st.sampled_from(["", 7, None]),
            ),
            "datatype": datatype,
            "shape": shape,
        }
        if draw(st.booleans()):
            if datatype == "BYTES":
                items = draw(st.lists(st.binary(max_size=8), min_size=count, max_size=count))
                chunk = b"".join(struct.pack("<I", len(x)) + x for x in items)
            elif datatype in DATATYPES:
                chunk = draw(
                    st.binary(
                        min_size=count * DATATYPES[datatype].itemsize,
                        max_size=count * DATATYPES[datatype].itemsize,
                    )
                )
            else:
                chunk = b""
            chunk = _sometimes(draw, st.just(chunk), st.binary(max_size=64))
            binary += chunk
            size = _sometimes(
                draw,
                st.just(len(chunk)),
                st.sampled_from([len(chunk) + 1, -1, 0, 2**40, "4", 1.5, None]),
            )
            t["parameters"] = {"binary_data_size": size}
            if _chance(draw, 0.1):
                t["data"] = draw(_data)
        else:
            if datatype == "BYTES":
                good = st.lists(st.text(max_size=6), min_size=count, max_size=count)
            elif datatype == "BOOL":
                good = st.lists(st.booleans(), min_size=count, max_size=count)
            else:
                good = st.lists(st.integers(0, 100), min_size=count, max_size=count)
            t["data"] = _sometimes(draw, good, _data)
        inputs.append(t)
    doc: dict = {"inputs": _sometimes(draw, st.just(inputs), _json_values, 0.05)}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["logits", "", 1]) | st.text(max_size=4)},
                    optional={
                        "parameters": st.fixed_dictionaries(
                            {},
                            optional={
                                "binary_data": st.booleans() | st.integers(),
                                "classification": st.integers(-2, 5) | st.booleans() | st.text(),
                            },
                        )
                    },
                ),
                max_size=3,
            )
            | _json_values
        )
    if draw(st.booleans()):
        doc["parameters"] = _sometimes(
            draw, st.dictionaries(st.sampled_from(["top_k", "binary_data_output", "x"]),
                                  st.booleans() | st.integers()), _json_values)  # fmt: skip
    if draw(st.booleans()):
        doc["id"] = _sometimes(draw, st.text(max_size=5), _json_values)
    head = json.dumps(doc).encode()
    if binary or _chance(draw, 0.1):
        header = _sometimes(
            draw, st.just(len(head)), st.sampled_from([len(head) - 1, len(head) + 3, -2])
        )
        return head + binary, header
    return head, None


@FUZZ
@given(_near_valid_requests())
def test_near_valid_requests_parse_or_400(case):
    body, header = case
    _parse_or_400(body, header)


# --- specific malformed bodies: 400 naming the field ---------------------------------------
def _req(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


FP = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}
BAD = [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b"\xff\xfe\x00", None, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),
    (_req([{**FP, "data": [1, 2, 3]}]), None, "data has 3 elements; shape [2, 2] needs 4"),
    (_req([{**FP, "shape": [-1, 4]}]), None, "input 'x': shape"),
    (_req([{**FP, "shape": [2**62, 2**62]}]), None, "needs 21267647932558653966460912964485513216"),
    (_req([{**FP, "shape": [True, 4]}]), None, "input 'x': shape"),
    (_req([{**FP, "datatype": "FLOAT"}]), None, "datatype 'FLOAT'"),
    (_req([{**FP, "data": [1, 2, "3", 4]}]), None, "FP32 data must be numbers"),
    (_req([{**FP, "datatype": "UINT8", "data": [1, 2, 3, 256]}]), None, "out of range for UINT8"),
    (
        _req([{**FP, "datatype": "INT32", "data": [1, 2, 3, 4.5]}]),
        None,
        "INT32 data must be integers",
    ),
    (_req([{**FP, "datatype": "BYTES", "data": [1, 2, 3, 4]}]), None, "UTF-8 strings"),
    (_req([FP, FP]), None, "input 'x' appears twice"),
    (_req([{"name": "x", "datatype": "FP32", "shape": [1]}]), None, "neither data nor"),
    (
        _req([{**FP, "parameters": {"binary_data_size": 16}}]),
        None,
        "both data and binary_data_size",
    ),
    (_req([{"name": "", "datatype": "FP32", "shape": [1], "data": [1]}]), None, "inputs[0].name"),
    (_req({"x": 1}), None, "inputs must be a list"),
    (
        _req([FP], outputs=[{"name": "y", "parameters": {"classification": -1}}]),
        None,
        "classification",
    ),
    (
        _req([FP], outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]),
        None,
        "binary_data",
    ),
    (_req([FP], outputs={"name": "y"}), None, "outputs must be a list"),
    (_req([FP], parameters=[1]), None, "parameters must be an object"),
    (_req([FP], parameters={"binary_data_output": 1}), None, "binary_data_output"),
    (_req([FP], id=5), None, "id must be a string"),
]


def _binary_req(size: int, payload: bytes, shape=(2, 2), datatype="FP32") -> tuple[bytes, int]:
    head = _req(
        [{"name": "x", "datatype": datatype, "shape": list(shape),
          "parameters": {"binary_data_size": size}}]
    )  # fmt: skip
    return head + payload, len(head)


BAD_BINARY = [
    (*_binary_req(17, bytes(16)), "binary_data_size 17 runs past the body"),
    (*_binary_req(12, bytes(12)), "binary_data_size is 12 bytes; shape [2, 2] of FP32 is 16"),
    (*_binary_req(16, bytes(20)), "4 bytes of binary data follow"),
    (*_binary_req(-1, b""), "binary_data_size must be an integer >= 0"),
    (*_binary_req(8, struct.pack("<I", 9) + b"abcd", (1,), "BYTES"), "element 0 says 9 bytes"),
    (*_binary_req(4, struct.pack("<I", 0), (2,), "BYTES"), "2 BYTES elements need at least 8"),
    (*_binary_req(9, struct.pack("<I", 1) + b"a" + b"zzzz", (1,), "BYTES"), "4 stray bytes"),
    (_req([FP]), 10_000, "Inference-Header-Content-Length"),
    (_req([FP]), -1, "Inference-Header-Content-Length"),
]


@pytest.mark.parametrize(("body", "header", "says"), BAD + BAD_BINARY)
def test_malformed_bodies_are_400_naming_the_field(body, header, says):
    with pytest.raises(BadRequest) as err:
        parse_request(body, header)
    assert err.value.status == 400
    assert says in str(err.value), str(err.value)


def test_nested_and_flat_json_data_are_the_same_row_major_tensor():
    flat = parse_request(_req([FP]))
    nested = parse_request(_req([{**FP, "data": [[1, 2], [3, 4]]}]))
    deep = parse_request(_req([{**FP, "data": [[[[1]], 2], [[3], [[[4]]]]]}]))
    want = np.array([[1, 2], [3, 4]], np.float32)
    for req in (flat, nested, deep):
        np.testing.assert_array_equal(req.inputs[0].data, want)
        assert req.inputs[0].data.dtype == np.float32


# --- round trips with tritonclient's own encoder and decoder ---------------------------------
_dtypes = st.sampled_from(
    [np.float32, np.float64, np.float16, np.uint8, np.uint16, np.int8, np.int32, np.int64, bool]
)


@st.composite
def _arrays(draw) -> np.ndarray:
    dtype = draw(_dtypes)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4))
    elements = None
    if np.dtype(dtype).kind == "f":
        elements = st.floats(-1e4, 1e4, width=np.dtype(dtype).itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements))


@st.composite
def _bytes_arrays(draw) -> np.ndarray:
    items = draw(st.lists(st.binary(max_size=12), min_size=0, max_size=6))
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


@settings(max_examples=150, deadline=None)
@given(arrays=st.lists(_arrays() | _bytes_arrays(), min_size=1, max_size=3), data=st.data())
def test_what_tritonclient_sends_parses_to_the_same_tensors(arrays, data):
    inputs = []
    for i, arr in enumerate(arrays):
        datatype = "BYTES" if arr.dtype == object else th.np_to_triton_dtype(arr.dtype)
        binary = data.draw(st.booleans()) or datatype == "BYTES"  # JSON BYTES must be UTF-8
        inp = th.InferInput(f"in{i}", list(arr.shape), datatype)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    outputs = [th.InferRequestedOutput("out", binary_data=False, class_count=3)]
    body, json_size = th.InferenceServerClient.generate_request_body(
        inputs, outputs, request_id="r1", parameters={"top_k": 2}
    )
    req = parse_request(body, json_size, model="m")
    assert req.id == "r1" and req.model == "m" and req.parameters["top_k"] == 2
    assert [(o.name, o.binary, o.classification) for o in req.outputs] == [("out", False, 3)]
    for arr, t in zip(arrays, req.inputs, strict=True):
        assert t.shape == list(arr.shape)
        if arr.dtype == object:
            assert t.data == list(arr)
        else:
            assert t.data.dtype == arr.dtype
            np.testing.assert_array_equal(t.data, arr)


@settings(max_examples=150, deadline=None)
@given(
    arrays=st.lists(_arrays() | _bytes_arrays(), min_size=1, max_size=3),
    binary=st.lists(st.none() | st.booleans(), min_size=3, max_size=3),
    default=st.booleans(),
)
def test_what_we_send_tritonclient_reads_back(arrays, binary, default):
    tensors = [
        Tensor(f"o{i}", "BYTES" if a.dtype == object else th.np_to_triton_dtype(a.dtype),
               list(a.shape), list(a.reshape(-1)) if a.dtype == object else a)
        for i, a in enumerate(arrays)
    ]  # fmt: skip
    # JSON BYTES travel as UTF-8 strings: only binary BYTES carry arbitrary bytes.
    assume(all(
        binary[i] or (binary[i] is None and default) or all(_utf8(x) for x in t.data)
        for i, t in enumerate(tensors) if t.datatype == "BYTES"
    ))  # fmt: skip
    from cvserve.serving.v2.types import RequestedOutput

    request = InferRequest(
        "m",
        [],
        outputs=[RequestedOutput(t.name, binary=b) for t, b in zip(tensors, binary, strict=False)],
        parameters={"binary_data_output": default},
    )
    body, json_size = encode_response(InferResponse("m", "1", tensors, id="r"), request)
    result = th.InferenceServerClient.parse_response_body(body, header_length=json_size)
    assert result.get_response()["id"] == "r"
    for arr, t in zip(arrays, tensors, strict=True):
        got = result.as_numpy(t.name)
        assert got.shape == arr.shape
        if arr.dtype == object:
            assert [
                bytes(x) if not isinstance(x, str) else x.encode() for x in got.reshape(-1)
            ] == list(arr)
        else:
            np.testing.assert_array_equal(got, arr)


def _utf8(x: bytes) -> bool:
    try:
        x.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _strict(text: bytes):
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_floats_are_strict_json_that_reads_back(datatype):
    """Issue 20 #12: no bare NaN/Infinity in a JSON answer; tritonclient reads the strings
    back as the same floats."""
    x = np.array([[1.5, np.nan, np.inf], [-np.inf, 0.0, -2.25]], DATATYPES[datatype])
    request = InferRequest("m", [], outputs=None)
    body, json_size = encode_response(
        InferResponse("m", "1", [Tensor("y", datatype, list(x.shape), x)]), request
    )
    assert json_size is None
    out = _strict(body)["outputs"][0]
    assert out["data"][1:4] == ["NaN", "Infinity", "-Infinity"]
    result = th.InferResult.from_response_body(body)
    back = result.as_numpy("y")
    np.testing.assert_array_equal(back, x)  # NaN == NaN here
    assert back.dtype == x.dtype
