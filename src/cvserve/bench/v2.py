"""KServe v2 for the bench: probe a v2 server (cvserve or Triton) over HTTP or gRPC, read
its model metadata, and prebuild one ``infer`` request per image.

What a request carries: the encoded image as a ``BYTES`` input of shape ``[1]`` (what a
Triton + DALI ensemble takes; the server decodes), or with ``input_tensor`` the model's
own input, preprocessed here once per image by cvserve's :class:`Preprocessor` (the spec
comes from cvserve's ``/v1/models/{m}``; for another server it is assumed from the input's
shape: ImageNet resize, crop and normalization). Over HTTP the tensor travels in the
binary tensor data extension (or as JSON ``data``), over gRPC in ``raw_input_contents``.
Every output the metadata lists is asked for, binary over HTTP (as ``tritonclient`` asks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

import cvserve.bench._http as _http
from cvserve.bench.errors import BenchError, ServerUnreachable, TargetNotServed
from cvserve.bench.inputs import BenchImage

if TYPE_CHECKING:
    from cvserve.bench._grpc import GrpcTarget

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "V2Input",
    "V2Setup",
    "choose_input",
    "grpc_request",
    "http_request",
    "prepare",
]

#: ``--protocol`` values: cvserve's own ``/v1`` predict route, KServe v2 over HTTP or gRPC.
PROTOCOLS: tuple[str, ...] = ("v1", "v2-http", "v2-grpc")
HEADER_LENGTH = "Inference-Header-Content-Length"
_U32 = struct.Struct("<I")
_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype(np.uint8)}


@dataclass(frozen=True)
class V2Input:
    """The input every request fills: its name, v2 datatype and the shape sent (one
    image: ``[1]`` for BYTES, ``[1, *row]`` for a batched model's tensor)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def tensor(self) -> bool:
        return self.datatype != "BYTES"


@dataclass
class V2Setup:
    """What :func:`prepare` found and built: the transport, the requests, and what the
    result records about the server (``server``)."""

    target: _http.Transport
    requests: list[Any]
    server: dict[str, Any]


# --- requests -----------------------------------------------------------------------------
def _bytes_element(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _tensor_bytes(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()


def http_request(
    target: _http.Target,
    model: str,
    inp: V2Input,
    payload: bytes | np.ndarray,
    outputs: Sequence[str],
    json_tensors: bool = False,
) -> bytes:
    """``POST /v2/models/{model}/infer`` for one image: binary tensor data (the JSON head's
    length in ``Inference-Header-Content-Length``), or all JSON with ``json_tensors``."""
    path = f"/v2/models/{quote(model, safe='')}/infer"
    entry: dict[str, Any] = {"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape)}
    if json_tensors:
        if not inp.tensor:
            raise ValueError("JSON carries tensors only: BYTES images need the binary extension")
        entry["data"] = np.asarray(payload).reshape(-1).tolist()
        outs = [{"name": o, "parameters": {"binary_data": False}} for o in outputs]
        body = json.dumps({"inputs": [entry], "outputs": outs}, separators=(",", ":")).encode()
        return target.request("POST", path, body, "application/json")
    raw = _tensor_bytes(payload) if inp.tensor else _bytes_element(payload)  # type: ignore[arg-type]
    entry["parameters"] = {"binary_data_size": len(raw)}
    outs = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    head = json.dumps({"inputs": [entry], "outputs": outs}, separators=(",", ":")).encode()
    return target.request(
        "POST", path, head + raw, "application/octet-stream", {HEADER_LENGTH: str(len(head))}
    )


def grpc_request(
    model: str, inp: V2Input, payload: bytes | np.ndarray, outputs: Sequence[str]
) -> bytes:
    """A serialized ``ModelInferRequest`` for one image (its data in ``raw_input_contents``)."""
    from cvserve.serving.v2.proto import inference_pb2 as pb

    raw = _tensor_bytes(payload) if inp.tensor else _bytes_element(payload)  # type: ignore[arg-type]
    msg = pb.ModelInferRequest(
        model_name=model,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=inp.name, datatype=inp.datatype, shape=list(inp.shape)
            )
        ],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        raw_input_contents=[raw],
    )
    return msg.SerializeToString()


# --- metadata -----------------------------------------------------------------------------
def choose_input(meta: dict[str, Any], name: str | None, tensor: bool) -> tuple[V2Input, tuple]:
    """The input to fill, from the model metadata: ``name`` if given, else the first BYTES
    input (images) or, with ``tensor``, the first other one. Returns it and the metadata's
    per-image shape (``-1`` where the metadata leaves it open). Raises :class:`BenchError`."""
    inputs = meta.get("inputs") or []
    listing = ", ".join(f"{t['name']} ({t['datatype']} {list(t['shape'])})" for t in inputs)
    model = meta.get("name", "the model")
    if name is not None:
        found = [t for t in inputs if t["name"] == name]
        if not found:
            raise BenchError(f"{model} has no input {name!r}; its inputs: {listing or 'none'}")
        spec = found[0]
    else:
        fits = [t for t in inputs if (t["datatype"] != "BYTES") == tensor]
        if not fits:
            want = "a tensor (non-BYTES)" if tensor else "a BYTES (encoded image)"
            hint = "drop --input-tensor" if tensor else "add --input-tensor"
            raise BenchError(
                f"{model} has no {want} input; its inputs: {listing or 'none'} "
                f"({hint}, or name one with --input-name)"
            )
        spec = fits[0]
    datatype = spec["datatype"]
    if tensor and datatype not in _DTYPES:
        raise BenchError(
            f"input {spec['name']!r} is {datatype}; --input-tensor sends FP32 or UINT8 "
            "(the model's preprocessed pixels)"
        )
    if not tensor and datatype != "BYTES":
        raise BenchError(
            f"input {spec['name']!r} is {datatype}, not BYTES: add --input-tensor to send "
            "preprocessed pixels"
        )
    shape = [int(d) for d in spec["shape"]]
    if not tensor:
        return V2Input(spec["name"], "BYTES", (1,)), tuple(shape)
    batched = bool(shape) and shape[0] == -1
    row = tuple(shape[1:] if batched else shape)
    return V2Input(spec["name"], datatype, (1, *row) if batched else row), row


async def _http_get(target: _http.Target, path: str, timeout: float) -> tuple[int, bytes]:
    return await _http.fetch(target, target.request("GET", path), timeout)


def _text(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


async def _wait_ready(check, url: str, ready_timeout: float) -> None:  # noqa: ANN001
    """Call ``check()`` (None when ready, else what is wrong) until ready or the deadline."""
    deadline = monotonic() + ready_timeout
    while True:
        problem = await check()
        if problem is None:
            return
        if monotonic() >= deadline:
            raise ServerUnreachable(f"server not ready: {problem}")
        await asyncio.sleep(0.1)


async def _http_metadata(
    target: _http.Target, url: str, model: str, timeout: float, ready_timeout: float
) -> dict[str, Any]:
    async def check() -> str | None:
        try:
            status, body = await _http_get(target, "/v2/health/ready", timeout)
        except (OSError, ConnectionError) as e:
            return f"cannot reach {url}: {e or type(e).__name__}"
        return None if status == 200 else f"GET /v2/health/ready answered {status}: {_text(body)}"

    await _wait_ready(check, url, ready_timeout)
    try:
        status, body = await _http_get(target, f"/v2/models/{quote(model, safe='')}", timeout)
    except (OSError, ConnectionError) as e:
        raise ServerUnreachable(f"cannot reach {url}: {e or type(e).__name__}") from e
    if status == 404:
        raise TargetNotServed(f"model {model!r} not served at {url} (v2 metadata): {_text(body)}")
    if status != 200:
        raise BenchError(f"GET /v2/models/{model} answered {status}: {_text(body)}")
    try:
        return json.loads(body)
    except ValueError as e:
        raise BenchError(f"the v2 metadata of {model!r} is not JSON: {e}") from e


async def _grpc_metadata(
    target: GrpcTarget, model: str, timeout: float, ready_timeout: float
) -> dict[str, Any]:
    import grpc

    from cvserve.serving.v2.proto import inference_pb2 as pb
    from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc

    await target.open()
    stub = pb_grpc.GRPCInferenceServiceStub(target.channel)
    where = f"grpc://{target.target}"

    async def check() -> str | None:
        try:
            if not (await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout)).ready:
                return "ServerReady answered ready=false"
            reply = await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise TargetNotServed(
                    f"model {model!r} not served at {where}: {e.details()}"
                ) from e
            return f"cannot reach {where}: {e.code().name} {e.details()}"
        return None if reply.ready else f"ModelReady({model}) answered ready=false"

    await _wait_ready(check, where, ready_timeout)
    try:
        m = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            raise TargetNotServed(f"model {model!r} not served at {where}: {e.details()}") from e
        raise BenchError(f"ModelMetadata({model}) failed: {e.code().name} {e.details()}") from e

    def tensors(ts) -> list[dict[str, Any]]:  # noqa: ANN001
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {
        "name": m.name,
        "versions": list(m.versions),
        "platform": m.platform,
        "inputs": tensors(m.inputs),
        "outputs": tensors(m.outputs),
    }


async def _v1_describe(http: _http.Target | None, model: str, timeout: float) -> dict | None:
    """cvserve's own description of the model (``/v1/models/{m}``), None elsewhere."""
    if http is None:
        return None
    try:
        status, body = await _http_get(http, f"/v1/models/{quote(model, safe='')}", timeout)
        doc = json.loads(body) if status == 200 else None
    except (OSError, ConnectionError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("preprocess"), dict) else None


async def _v1_models(http: _http.Target | None, timeout: float) -> Any:
    if http is None:
        return None
    try:
        status, body = await _http_get(http, "/v1/models", timeout)
        return json.loads(body) if status == 200 else None
    except (OSError, ConnectionError, ValueError):
        return None


# --- tensors ------------------------------------------------------------------------------
def _assumed_spec(row: tuple, datatype: str):  # noqa: ANN202
    from cvserve.images.spec import PreprocessSpec

    dtype = "uint8" if datatype == "UINT8" else "float32"
    if len(row) == 3 and row[0] == 3 and min(row[1:]) > 0:
        return PreprocessSpec(height=row[1], width=row[2], layout="NCHW", dtype=dtype)
    if len(row) == 3 and row[2] == 3 and min(row[:2]) > 0:
        return PreprocessSpec(height=row[0], width=row[1], layout="NHWC", dtype=dtype)
    raise BenchError(
        f"cannot tell the model's image size from its input shape {list(row)}: "
        "--input-tensor needs [3, H, W] or [H, W, 3] (or a cvserve server's /v1 spec)"
    )


def preprocess_images(
    images: Sequence[BenchImage], spec: Any, decoder: str = "pil-reduced"
) -> list[np.ndarray]:
    """Each image through cvserve's preprocessing, once: one model-input row per image."""
    from cvserve.images.decode import ImageError
    from cvserve.images.preprocess import Preprocessor

    pre = Preprocessor(spec, decoder=decoder)
    rows = []
    for im in images:
        x = np.empty(spec.input_shape, dtype=spec.dtype)
        try:
            pre.run(im.data, x)
        except ImageError as e:
            raise BenchError(f"cannot preprocess {im.name}: {e}") from e
        rows.append(x)
    return rows


# --- the whole preparation --------------------------------------------------------------
async def prepare(
    *,
    protocol: str,
    http: _http.Target | None,
    gtarget: GrpcTarget | None,
    url: str,
    model: str,
    images: Sequence[BenchImage],
    input_name: str | None,
    input_tensor: bool,
    json_tensors: bool,
    timeout: float,
    probe_timeout: float,
    ready_timeout: float,
) -> V2Setup:
    """Wait for the server, read the model's metadata, build the requests and send the
    first one. Raises :class:`ServerUnreachable`, :class:`TargetNotServed` (404 /
    NOT_FOUND) or :class:`BenchError` (the server refused the request: its message)."""
    try:
        grpc_target = None if gtarget is None else gtarget.target
        if protocol == "v2-grpc":
            assert gtarget is not None
            meta = await _grpc_metadata(gtarget, model, probe_timeout, ready_timeout)
            where = f"grpc://{grpc_target}"
        else:
            assert http is not None
            meta = await _http_metadata(http, url, model, probe_timeout, ready_timeout)
            where = url
        inp, row = choose_input(meta, input_name, input_tensor)
        outputs = [o["name"] for o in meta.get("outputs") or []]
        server: dict[str, Any] = {
            "url": url,
            "protocol": protocol,
            "grpc_target": grpc_target,
            "models": await _v1_models(http, probe_timeout),
            "v2_metadata": meta,
            "input": {"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape)},
            "outputs": outputs,
        }
        payloads: list[bytes | np.ndarray]
        if input_tensor:
            from cvserve.images.spec import PreprocessSpec

            described = await _v1_describe(http, model, probe_timeout)
            if described is not None:
                spec = PreprocessSpec.from_dict(described["preprocess"])
                decoder = described.get("decoder") or "pil-reduced"
                source = "/v1/models"
            else:
                spec, decoder, source = _assumed_spec(row, inp.datatype), "pil-reduced", "assumed"
                log.warning(
                    "%s: no cvserve /v1 description; assuming ImageNet preprocessing to %s",
                    model,
                    list(spec.input_shape),
                )
            want = tuple(spec.input_shape)
            if len(row) != len(want) or any(
                d not in (-1, w) for d, w in zip(row, want, strict=True)
            ):
                raise BenchError(
                    f"input {inp.name!r} takes {list(row)} per image; preprocessing for "
                    f"{model} gives {list(want)}"
                )
            if inp.datatype != ("UINT8" if spec.dtype == "uint8" else "FP32"):
                raise BenchError(
                    f"input {inp.name!r} is {inp.datatype}; preprocessing gives {spec.dtype}"
                )
            inp = V2Input(inp.name, inp.datatype, (1, *want) if len(inp.shape) > len(row) else want)
            server["input"]["shape"] = list(inp.shape)
            server["preprocess"] = {"spec": spec.to_dict(), "decoder": decoder, "from": source}
            payloads = list(preprocess_images(images, spec, decoder))
        else:
            payloads = [im.data for im in images]

        target: _http.Transport
        if gtarget is not None:
            target = gtarget
            requests: list[Any] = [grpc_request(model, inp, p, outputs) for p in payloads]
        else:
            assert http is not None
            target = http
            requests = [http_request(http, model, inp, p, outputs, json_tensors) for p in payloads]
        del payloads

        try:
            if gtarget is not None:
                status, kind, body, _ = await gtarget.call(requests[0], timeout)
                if kind != _http.ERR_NONE:
                    raise ServerUnreachable(f"first infer call to {where} failed: {_text(body)}")
            else:
                status, body = await _http.fetch(http, requests[0], timeout)  # type: ignore[arg-type]
        except TimeoutError:  # a slow server is what a bench is for: measure it
            log.warning("the first infer request took over %ss", timeout)
            return V2Setup(target, requests, server)
        except (OSError, ConnectionError) as e:
            raise ServerUnreachable(
                f"first infer request to {where} failed: {e or type(e).__name__}"
            ) from e
        if status == 404:
            raise TargetNotServed(f"model {model!r} not served at {where}: {_text(body)}")
        if status == 400:
            raise BenchError(f"{where} refused the first infer request (400): {_text(body)}")
        return V2Setup(target, requests, server)
    except BaseException:
        if gtarget is not None:
            await gtarget.close()
        raise
