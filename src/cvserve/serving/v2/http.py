"""The KServe v2 (Open Inference Protocol) HTTP/REST door, as Triton serves it, so that
``tritonclient.http`` works unmodified. It only translates: JSON and the binary tensor
data extension to :class:`InferRequest` and :class:`InferResponse` back; everything else
is :mod:`cvserve.serving.v2.infer` and the core.

Routes (``routes()``, mounted by ``create_app``): ``GET /v2``, ``/v2/health/live``,
``/v2/health/ready``, ``/v2/models/{m}[/versions/{v}]`` (metadata),
``.../ready``, ``POST .../infer``, and the statistics extension ``GET /v2/models/stats``,
``GET /v2/models/{m}[/versions/{v}]/stats``, and the model repository extension as
Triton routes it: ``POST /v2/repository/index``, ``/v2/repository/models/{m}/load`` and
``/unload`` (:mod:`cvserve.serving.control`). Without ``/versions/{v}`` a request goes to
the newest version loaded.

Wire format:

* request body: a JSON object, or (header ``Inference-Header-Content-Length: n``) n bytes
  of JSON followed by the inputs' raw bytes in input order, each input declaring its size
  in ``"parameters": {"binary_data_size": size}``; numbers are little-endian, BYTES
  elements are each a 4-byte little-endian length and the bytes. JSON ``data`` is flat or
  nested, row-major; BYTES in JSON are UTF-8 strings. ``Content-Encoding: gzip|deflate``
  bodies are inflated (the body limit applies to both sizes).
* response: JSON, or binary outputs after the JSON (``Inference-Header-Content-Length``,
  ``binary_data_size`` on each binary output) for outputs asked with
  ``"parameters": {"binary_data": true}``, or all when the request sets
  ``"binary_data_output": true``. JSON is strict: a non-finite float in JSON ``data`` is the
  string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (numpy, and so ``tritonclient``'s
  ``as_numpy``, reads each back as the same float); binary outputs carry them as they are.
* errors: ``{"error": "message"}`` with the same status codes as ``/v1`` (429 with
  ``Retry-After``, 503 while draining). Every response has ``Server-Timing``; ``recv``
  covers reading and parsing the body.

:func:`parse_request` and :func:`encode_response` are pure functions: any body either
parses or raises :class:`BadRequest` naming the field.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.errors import RequestError
from cvserve.serving.control import load_parameters, repository
from cvserve.serving.core import Servable
from cvserve.serving.door import TIMEOUT_HEADER, handle, internal_message
from cvserve.serving.errors import (
    BadRequest,
    BodyTooLarge,
    UnsupportedMediaType,
    http_status,
)
from cvserve.serving.httpwire import byte_count, json_response, read_body
from cvserve.serving.state import ServerState
from cvserve.serving.v2.infer import (
    infer,
    lookup,
    model_metadata,
    server_metadata,
)
from cvserve.serving.v2.types import (
    DATATYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
)
from cvserve.trace import Trace, format_server_timing

__all__ = ["HEADER_LENGTH", "encode_response", "parse_request", "routes"]

log = logging.getLogger(__name__)

#: Request and response header: the JSON part's length when binary tensor data follows.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: More dimensions than any image tensor has; bounds the work of checking a shape.
MAX_DIMS = 16
#: JSON parts larger than this are parsed on a pool thread, not on the event loop.
_PARSE_OFF_LOOP_BYTES = 64 * 1024
_U32 = struct.Struct("<I")


# --- request parsing (pure) ---------------------------------------------------------------
def parse_request(
    body: bytes,
    header_length: int | None = None,
    *,
    model: str = "",
    version: str | None = None,
) -> InferRequest:
    """A v2 inference request from its HTTP body (``header_length``: the
    ``Inference-Header-Content-Length`` header, None when absent). Raises
    :class:`BadRequest` for anything malformed; tensors are checked against their own
    shape and datatype here, against the model in ``infer``."""
    if header_length is None:
        head, binary = body, memoryview(b"")
    else:
        if (
            isinstance(header_length, bool)
            or not isinstance(header_length, int)
            or not 0 <= header_length <= len(body)
        ):
            raise BadRequest(
                f"{HEADER_LENGTH} is {header_length!r}; the body has {len(body)} bytes",
                field=HEADER_LENGTH,
            )
        head, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the request is not valid JSON: {e}", field="body") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object", field="body")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"id must be a string, got {rid!r}", field="id")
    params = _object(doc.get("parameters"), "parameters")
    if not isinstance(params.get("binary_data_output", False), bool):
        raise BadRequest("parameters.binary_data_output must be true or false", field="parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list):
        raise BadRequest("inputs must be a list of tensors", field="inputs")
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _input(raw, f"inputs[{i}]", binary, offset)
        if any(t.name == tensor.name for t in inputs):
            raise BadRequest(f"input {tensor.name!r} appears twice", field=tensor.name)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data follow the inputs' "
            f"binary_data_size ({offset} bytes in all)",
            field="binary_data_size",
        )
    return InferRequest(
        model=model,
        inputs=inputs,
        version=version,
        id=rid,
        outputs=_outputs(doc.get("outputs")),
        parameters=params,
    )


def _object(obj: Any, field: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise BadRequest(f"{field} must be an object", field=field)
    return obj


def _input(raw: Any, where: str, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One input tensor; returns it and the bytes of ``binary`` it used from ``offset``."""
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object", field=where)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.name must be a non-empty string", field=where)
    field = f"input {name!r}"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise BadRequest(
            f"{field}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}", field=name
        )
    shape = raw.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise BadRequest(
            f"{field}: shape must be a list of at most {MAX_DIMS} integers >= 0, got {shape!r}",
            field=name,
        )
    count = math.prod(shape)
    params = _object(raw.get("parameters"), f"{field}.parameters")
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise BadRequest(f"{field} has neither data nor binary_data_size", field=name)
        data = _from_json(raw["data"], datatype, shape, count, field)
        return Tensor(name, datatype, shape, data, params), 0
    if type(size) is not int or size < 0:
        raise BadRequest(f"{field}: binary_data_size must be an integer >= 0", field=name)
    if "data" in raw:
        raise BadRequest(f"{field} has both data and binary_data_size", field=name)
    if offset + size > len(binary):
        raise BadRequest(
            f"{field}: binary_data_size {size} runs past the body ({len(binary) - offset} "
            "bytes of binary data left)",
            field=name,
        )
    chunk = binary[offset : offset + size]
    data = _from_binary(chunk, datatype, shape, count, field)
    return Tensor(name, datatype, shape, data, params), size


def _from_binary(
    chunk: memoryview, datatype: str, shape: list[int], count: int, field: str
) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        items = _split_bytes(chunk, count, field)
        return items
    dtype = DATATYPES[datatype].newbyteorder("<")  # type: ignore[union-attr]
    need = count * dtype.itemsize
    if len(chunk) != need:
        raise BadRequest(
            f"{field}: binary_data_size is {len(chunk)} bytes; shape {shape} of {datatype} "
            f"is {need} bytes",
            field=field,
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _split_bytes(buf: memoryview, count: int, field: str) -> list[bytes]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    if count * 4 > len(buf):
        raise BadRequest(
            f"{field}: {count} BYTES elements need at least {count * 4} bytes, got {len(buf)}",
            field=field,
        )
    items: list[bytes] = []
    off, end = 0, len(buf)
    while off < end and len(items) < count:
        if off + 4 > end:
            break
        (n,) = _U32.unpack_from(buf, off)
        off += 4
        if off + n > end:
            raise BadRequest(
                f"{field}: element {len(items)} says {n} bytes, {end - off} are left",
                field=field,
            )
        items.append(bytes(buf[off : off + n]))
        off += n
    if len(items) != count or off != end:
        raise BadRequest(
            f"{field}: binary data holds {len(items)} BYTES elements"
            + (f" and {end - off} stray bytes" if off != end else "")
            + f"; shape needs {count}",
            field=field,
        )
    return items


_JSON_TYPES: dict[str, set[type]] = {"BOOL": {bool}, "FP": {int, float}, "INT": {int}}


def _from_json(
    data: Any, datatype: str, shape: list[int], count: int, field: str
) -> np.ndarray | list[bytes]:
    flat = _flatten(data, field)
    if len(flat) != count:
        raise BadRequest(
            f"{field}: data has {len(flat)} elements; shape {shape} needs {count}", field=field
        )
    if datatype == "BYTES":
        try:
            if not all(type(x) is str for x in flat):
                raise TypeError
            return [x.encode("utf-8") for x in flat]
        except (TypeError, UnicodeEncodeError):
            raise BadRequest(f"{field}: BYTES data must be UTF-8 strings", field=field) from None
    kind = "BOOL" if datatype == "BOOL" else ("FP" if datatype.startswith("FP") else "INT")
    allowed = _JSON_TYPES[kind]
    types = set(map(type, flat))
    if not types <= allowed:
        want = {"BOOL": "true/false", "FP": "numbers", "INT": "integers"}[kind]
        raise BadRequest(f"{field}: {datatype} data must be {want}", field=field)
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError, TypeError):
        raise BadRequest(f"{field}: a value is out of range for {datatype}", field=field) from None


def _flatten(data: Any, field: str) -> list[Any]:
    """Row-major elements of flat or nested ``data`` (iterative: any nesting depth)."""
    if not isinstance(data, list):
        raise BadRequest(f"{field}: data must be a list", field=field)
    if list not in set(map(type, data)):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if type(x) is list:
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("outputs must be a list", field="outputs")
    outs: list[RequestedOutput] = []
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not o["name"]:
            raise BadRequest(f"outputs[{i}] must be an object with a name", field="outputs")
        name = o["name"]
        params = _object(o.get("parameters"), f"output {name!r}.parameters")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"output {name!r}: binary_data must be true or false", field=name)
        k = params.get("classification", 0)
        if type(k) is not int or k < 0:
            raise BadRequest(
                f"output {name!r}: classification must be an integer >= 0, got {k!r}", field=name
            )
        outs.append(RequestedOutput(name, binary=binary, classification=k, parameters=params))
    return outs


# --- response encoding (pure) -------------------------------------------------------------
def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """``(body, json_length)``: json_length is None for an all-JSON body, else the length
    of its JSON part (the ``Inference-Header-Content-Length`` to send)."""
    default = bool(request.parameters.get("binary_data_output", False))
    asked = {o.name: o.binary for o in request.outputs or ()}
    head: dict[str, Any] = {"model_name": response.model, "model_version": response.version}
    if response.id is not None:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = response.parameters
    outputs = []
    chunks: list[bytes] = []
    for t in response.outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        binary = asked.get(t.name)
        if binary if binary is not None else default:
            raw = _tensor_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(t)
        outputs.append(entry)
    head["outputs"] = outputs
    text = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


def _tensor_bytes(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        return b"".join(_U32.pack(len(x)) + x for x in t.data)  # type: ignore[operator]
    arr = np.asarray(t.data)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _json_data(t: Tensor) -> list[Any]:
    if t.datatype == "BYTES":
        return [x.decode("utf-8", "replace") for x in t.data]  # type: ignore[union-attr]
    arr = np.asarray(t.data).reshape(-1)
    values = arr.tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        # strict JSON has no NaN or Infinity: they travel as strings, which numpy (and so
        # tritonclient's as_numpy) reads back as the same float
        values = [x if math.isfinite(x) else _NON_FINITE[str(x)] for x in values]
    return values


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


# --- routes -------------------------------------------------------------------------------
def _v2_error(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    status = http_status(e)
    headers = {}
    if status == 429:
        headers["Retry-After"] = str(getattr(e, "retry_after_s", 1))
    return status, {"error": internal_message(e)}, headers


def _answer(fn: Callable[[ServerState, Request], Any]):
    """A route that only reads or changes server state (``fn`` returns, or is a coroutine
    of, ``(status, payload)``): its whole time is ``encode``."""

    async def handler(request: Request) -> Response:
        t0 = time.perf_counter()
        headers: dict[str, str] = {}
        try:
            result = fn(request.app.state.cvserve, request)
            status, payload = (await result) if inspect.isawaitable(result) else result
        except RequestError as e:
            status, payload, headers = _v2_error(e)
        if payload is None:  # a repository load or unload: 200 and no body, as Triton's
            resp = Response(b"", status, media_type="application/json")
        else:
            resp = json_response(payload, status, headers)
        resp.headers["Server-Timing"] = format_server_timing({"encode": time.perf_counter() - t0})
        return resp

    return handler


def _servable(state: ServerState, request: Request):
    p = request.path_params
    return lookup(state.servables, p["model"], p.get("version"), state.versions)


def _server_meta(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    return 200, server_metadata()


def _live(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    return 200, {"live": True}


def _ready(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    ready = state.ready
    return (200 if ready else 503), {"ready": ready}


def _model_ready(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    s = _servable(state, request)
    ready = state.model_ready(s)
    return (200 if ready else 503), {"name": s.name, "ready": ready}


def _model_meta(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    servable = _servable(state, request)
    return 200, model_metadata(servable, list(state.versions.get(servable.name, {})) or None)


def _all_stats(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    return 200, {"model_stats": [s.stats.to_triton() for s in state.servables.values()]}


def _model_stats(state: ServerState, request: Request) -> tuple[int, dict[str, Any]]:
    return 200, {"model_stats": [_servable(state, request).stats.to_triton()]}


def _header_length(request: Request) -> int | None:
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return None
    n = byte_count(raw)
    if n is None:
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, got {raw!r}", field=HEADER_LENGTH)
    return n


def _inflate(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body under ``Content-Encoding`` gzip or deflate, never past ``limit`` bytes."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {enc!r}: send gzip, deflate or identity")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"the {enc} body does not inflate: {e}", field="body") from None
    if len(out) > limit or d.unconsumed_tail:
        raise BodyTooLarge(
            f"the inflated request body exceeds the limit of {limit} bytes", max_body_bytes=limit
        )
    return out


async def _infer_route(request: Request) -> Response:
    """``POST /v2/models/{m}[/versions/{v}]/infer``."""
    state: ServerState = request.app.state.cvserve
    name = request.path_params["model"]
    version = request.path_params.get("version")
    limit = state.config.max_body_bytes

    async def receive() -> tuple[bytes, int | None]:
        raw = await read_body(request, limit)
        raw = _inflate(raw, request.headers.get("content-encoding"), limit)
        return raw, _header_length(request)

    async def run(target: Servable, received, trace: Trace, deadline: float):
        raw, header_length = received
        parse = partial(parse_request, raw, header_length, model=name, version=version)
        json_part = len(raw) if header_length is None else header_length
        if json_part > _PARSE_OFF_LOOP_BYTES:  # big JSON tensors: off the event loop
            req = await state.pool.submit(trace, parse, deadline=deadline, stage="recv")
        else:
            req = parse()
            trace.mark("recv")
        return (await infer(target, req, trace, deadline), req), req.images

    answer = await handle(
        state, name, state.servables, lambda: lookup(state.servables, name, version, state.versions),
        receive, run, lambda result: encode_response(*result),
        timeout=request.headers.get(TIMEOUT_HEADER),
    )  # fmt: skip
    if answer.error is None:
        body, json_length = answer.body
        headers: dict[str, str] = {}
    else:
        status, payload, headers = _v2_error(answer.error)
        body, json_length = json.dumps(payload, separators=(",", ":")).encode(), None
    headers["Server-Timing"] = answer.trace.server_timing()
    if json_length is not None:
        headers[HEADER_LENGTH] = str(json_length)
    if state.draining:  # no keep-alive past a drain: clients reconnect elsewhere
        headers["Connection"] = "close"
    media = "application/json" if json_length is None else "application/octet-stream"
    return Response(body, status_code=answer.status, media_type=media, headers=headers)


# --- the model repository extension (Triton's routes) -------------------------------------
async def _repository_json(request: Request, state: ServerState) -> dict[str, Any]:
    raw = await read_body(request, state.config.max_body_bytes)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise BadRequest(f"the request is not valid JSON: {e}", field="body") from None
    return _object(doc, "body")


async def _repository_index(state: ServerState, request: Request) -> tuple[int, Any]:
    """``POST /v2/repository/index`` (``{"ready": true}``: only the loaded)."""
    ready = (await _repository_json(request, state)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("ready must be true or false", field="ready")
    return 200, [r.to_json() for r in repository(state).index(ready)]


async def _repository_load(state: ServerState, request: Request) -> tuple[int, None]:
    """``POST /v2/repository/models/{m}/load``: answers once the model serves."""
    params = _object((await _repository_json(request, state)).get("parameters"), "parameters")
    await repository(state).load(request.path_params["model"], load_parameters(params))
    return 200, None


async def _repository_unload(state: ServerState, request: Request) -> tuple[int, None]:
    """``POST /v2/repository/models/{m}/unload``: every version."""
    await _repository_json(request, state)
    await repository(state).unload(request.path_params["model"])
    return 200, None


def routes() -> list[Route]:
    """The v2 routes, in matching order (``/v2/models/stats`` before a model's routes)."""
    model = "/v2/models/{model}"
    version = "/v2/models/{model}/versions/{version}"
    get, post = ["GET"], ["POST"]
    return [
        Route("/v2", _answer(_server_meta), methods=get),
        Route("/v2/health/live", _answer(_live), methods=get),
        Route("/v2/health/ready", _answer(_ready), methods=get),
        Route("/v2/models/stats", _answer(_all_stats), methods=get),
        Route("/v2/repository/index", _answer(_repository_index), methods=post),
        Route("/v2/repository/models/{model}/load", _answer(_repository_load), methods=post),
        Route("/v2/repository/models/{model}/unload", _answer(_repository_unload), methods=post),
        Route(f"{model}/stats", _answer(_model_stats), methods=get),
        Route(f"{version}/stats", _answer(_model_stats), methods=get),
        Route(f"{model}/ready", _answer(_model_ready), methods=get),
        Route(f"{version}/ready", _answer(_model_ready), methods=get),
        Route(f"{model}/infer", _infer_route, methods=["POST"]),
        Route(f"{version}/infer", _infer_route, methods=["POST"]),
        Route(model, _answer(_model_meta), methods=get),
        Route(version, _answer(_model_meta), methods=get),
    ]
