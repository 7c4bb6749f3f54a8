"""One KServe v2 inference request run through the serving core, whichever door it came
through (HTTP/REST or gRPC); and the v2 metadata both doors answer with.

Inputs. A model takes exactly one input tensor per request, either

* encoded images: one ``BYTES`` tensor of shape ``[N]`` or ``[N, 1]`` (what Triton + DALI
  ensembles take). Its name is free (the metadata calls it ``IMAGE``), so a client written
  for an ensemble whose input has another name works unchanged. Each image goes through
  cvserve's own decoding and preprocessing; or
* the model's own input tensor (``FP32``, or ``UINT8`` for a model with normalization
  folded in), named as the model's input, of shape ``[N, *input_shape]``: each row is a
  preprocessed image, preprocessing is skipped.

The N images run as N concurrent requests of the core (so they may ride in different
batches, beside other clients' images); one failing fails the request (its index in the
message) and cancels the rest. A request carries at most the model's ``max_queue`` images.

Outputs. ``output_table(servable)`` lists them; each has the batch axis first:

* the model's raw outputs (names and rows exactly as the runtime returns them);
* the task's results: ``detect`` -> ``boxes`` FP32 [N, K, 4] (xyxy, original-image
  pixels), ``scores`` FP32 [N, K], ``labels`` INT64 [N, K] (class index), ``count`` INT32
  [N]: K is the most detections of any image, rows past ``count[i]`` are zeros;
  ``segment`` -> ``mask`` UINT8 (UINT16 past 255 classes) [N, H, W]; ``depth`` -> ``depth``
  FP32 [N, H, W]; ``embed`` -> ``embedding`` FP32 [N, D] (L2-normalised). A mask or depth map is at the image's original size, so a request whose
  images differ in size gets 400 for them (ask for the raw outputs, or send one image, or
  images of one size); ``classify`` adds nothing: use the classification extension;
* a pipeline (a servable without raw outputs) takes images only and answers one output
  ``result``: BYTES [N], each element the JSON answer ``/v1`` gives for that image.

No outputs requested means all of them. The classification extension
(``"parameters": {"classification": k}`` on a requested numeric output) returns BYTES
[N, min(k, row size)] strings ``"{score:f}:{index}"``, plus ``":{label}"`` where the row
has one element per model label, over the output's own values, as Triton does (for
logits, scores are logits, not the softmax probabilities ``/v1`` reports).

Parameters. Request parameters other than the v2/Triton ones (``RESERVED_PARAMETERS``,
``triton_*``) are the head's own (``top_k``, ``threshold``, ...; 400 if unknown).
``timeout`` (microseconds, as Triton) tightens the deadline; ``priority`` is accepted and
ignored; a ``sequence_id`` is refused (no stateful models here).

Trace. Each image gets its own :class:`Trace`, started where the request's is; the
request's trace then takes the stages of the slowest image (the one that finished last),
so a response's stages still add up to its time. Assembling the outputs is
``postprocess``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve import __version__
from cvserve.errors import RequestError
from cvserve.serving.core import Prediction, Servable
from cvserve.serving.errors import BadRequest, NotServed
from cvserve.serving.v2.types import (
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    datatype_of,
)
from cvserve.tasks.encode import encode_result
from cvserve.trace import Trace

__all__ = [
    "EXTENSIONS",
    "IMAGE_INPUT",
    "RESERVED_PARAMETERS",
    "RESULT_OUTPUT",
    "VERSIONS",
    "OutputSpec",
    "check_version",
    "infer",
    "lookup",
    "model_metadata",
    "output_table",
    "server_metadata",
    "version_of",
]

#: The name the metadata gives the encoded-images input (any BYTES input name is taken).
IMAGE_INPUT = "IMAGE"
#: A pipeline's one output: its JSON answer per image.
RESULT_OUTPUT = "result"
#: The version of a servable that has no other (a pipeline; a model stored before versions).
VERSIONS = ("1",)
#: v2 protocol extensions both doors implement.
EXTENSIONS = (
    "classification", "binary_tensor_data", "parameters", "statistics", "model_repository",
)  # fmt: skip
#: Request parameters of the protocol (and Triton's), not the head's.
RESERVED_PARAMETERS = frozenset(
    {
        "binary_data_output",
        "timeout",
        "priority",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "headers",
    }
)
_RESERVED_PREFIX = "triton_"


@dataclass(frozen=True)
class OutputSpec:
    """One output a servable answers: its v2 datatype and shape (batch axis first, -1 where
    it varies); ``raw`` is True for the runtime's own outputs."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# --- metadata --------------------------------------------------------------------------
def server_metadata() -> dict[str, Any]:
    """``GET /v2`` (gRPC ``ServerMetadata``)."""
    return {"name": "cvserve", "version": __version__, "extensions": list(EXTENSIONS)}


def lookup(
    servables: Mapping[str, Servable],
    name: str,
    version: str | None = None,
    versions: Mapping[str, Mapping[str, Servable]] | None = None,
) -> Servable:
    """The servable called ``name`` at ``version`` (None or "": the newest loaded) among
    ``servables`` (the newest of each name) and ``versions`` (every loaded version of
    each model, by name), else :class:`NotServed` (404)."""
    servable = servables.get(name)
    if servable is None:
        raise NotServed(
            f"no model named {name!r}; serving: {', '.join(servables) or 'none'}",
            models=list(servables),
        )
    if version in (None, "", version_of(servable)):
        return servable
    loaded = (versions or {}).get(name) or {version_of(servable): servable}
    found = loaded.get(version)
    if found is None:
        raise NotServed(
            f"model {name!r} has no version {version!r} loaded; versions: {', '.join(loaded)}",
            versions=list(loaded),
        )
    return found


def version_of(servable: Servable) -> str:
    """The version a servable runs ("1" for a pipeline, which has one)."""
    return getattr(servable, "version", VERSIONS[0])


def check_version(servable: Servable, version: str | None) -> None:
    if version not in (None, "", version_of(servable)):
        raise NotServed(
            f"model {servable.name!r} has no version {version!r}; versions: {version_of(servable)}",
            versions=[version_of(servable)],
        )


def _is_model(servable: Servable) -> bool:
    return getattr(servable, "output_names", None) is not None


def _input_specs(servable: Servable) -> list[dict[str, Any]]:
    specs = [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}]
    if _is_model(servable):
        name, datatype, shape = _tensor_input(servable)
        specs.append({"name": name, "datatype": datatype, "shape": [-1, *shape]})
    return specs


def _tensor_input(servable: Any) -> tuple[str, str, tuple[int, ...]]:
    """(name, datatype, row shape) of a model's own input tensor."""
    return (
        servable.meta.input_name,
        datatype_of(servable.input_dtype),
        tuple(servable.input_shape),
    )


def _raw_output_specs(servable: Any) -> list[OutputSpec]:
    """The model's raw outputs as its runtime declares them (open dimensions as -1)."""
    return [
        OutputSpec(name, datatype_of(dtype), (-1, *row), True)
        for name, dtype, row in servable.output_signature()
    ]


def _task_output_specs(servable: Any, raw: list[OutputSpec]) -> list[OutputSpec]:
    task = servable.task
    if task == "detect":
        return [
            OutputSpec("boxes", "FP32", (-1, -1, 4), False),
            OutputSpec("scores", "FP32", (-1, -1), False),
            OutputSpec("labels", "INT64", (-1, -1), False),
            OutputSpec("count", "INT32", (-1,), False),
        ]
    if task == "segment":
        classes = raw[0].shape[1] if raw and len(raw[0].shape) > 1 else -1
        if classes < 0:
            classes = len(servable.meta.labels)
        return [OutputSpec("mask", "UINT8" if classes <= 255 else "UINT16", (-1, -1, -1), False)]
    if task == "depth":
        return [OutputSpec("depth", "FP32", (-1, -1, -1), False)]
    if task == "embed":
        return [OutputSpec("embedding", "FP32", (-1, -1), False)]
    return []


_TABLES: weakref.WeakKeyDictionary[Any, dict[str, OutputSpec]] = weakref.WeakKeyDictionary()


def output_table(servable: Servable) -> dict[str, OutputSpec]:
    """Every output ``servable`` answers, by name, in metadata order (read-only)."""
    try:
        return _TABLES[servable]
    except (KeyError, TypeError):
        pass
    if not _is_model(servable):
        table = {RESULT_OUTPUT: OutputSpec(RESULT_OUTPUT, "BYTES", (-1,), False)}
    else:
        raw = _raw_output_specs(servable)
        table = {s.name: s for s in raw}
        for spec in _task_output_specs(servable, raw):
            table.setdefault(spec.name, spec)  # a raw output of the same name wins
    try:
        _TABLES[servable] = table
    except TypeError:  # not weak-referenceable: computed each time
        pass
    return table


def model_metadata(servable: Servable, versions: list[str] | None = None) -> dict[str, Any]:
    """``GET /v2/models/{name}`` (gRPC ``ModelMetadata``); ``versions``: every version of
    it loaded (default: its own)."""
    return {
        "name": servable.name,
        "versions": versions or [version_of(servable)],
        "platform": "cvserve",
        "inputs": _input_specs(servable),
        "outputs": [s.to_json() for s in output_table(servable).values()],
    }


# --- inference --------------------------------------------------------------------------
async def infer(
    servable: Servable, request: InferRequest, trace: Trace, deadline: float
) -> InferResponse:
    """Run ``request`` against ``servable`` through the core. ``deadline`` is a
    perf_counter time (the door's; a ``timeout`` parameter may shorten it).

    Everything about the request is checked before any image reaches the core: a bad
    request raises :class:`BadRequest` (or the head's ``ParamError``), 400."""
    check_version(servable, request.version)
    params, deadline = _parameters(servable, request.parameters, trace, deadline)
    input_name, items = _inputs(servable, request.inputs)
    wanted = _requested(servable, request.outputs)
    preds = await _predict_all(servable, input_name, items, trace, deadline, params)
    outputs = [_output(servable, want, preds) for want in wanted]
    trace.mark("postprocess")
    return InferResponse(
        model=servable.name, version=version_of(servable), outputs=outputs, id=request.id
    )


def _parameters(
    servable: Servable, given: Mapping[str, Any], trace: Trace, deadline: float
) -> tuple[dict[str, Any], float]:
    if not isinstance(given, Mapping):
        raise BadRequest("parameters must be an object")
    head: dict[str, Any] = {}
    for key, value in given.items():
        if key.startswith(_RESERVED_PREFIX) or key in RESERVED_PARAMETERS:
            continue
        head[key] = value
    seq = given.get("sequence_id")
    if seq not in (None, 0, ""):
        raise BadRequest(
            f"parameters.sequence_id: {servable.name} is stateless; sequences are not supported",
            parameter="sequence_id",
        )
    timeout = given.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
            raise BadRequest(
                f"parameters.timeout must be a positive integer of microseconds, got {timeout!r}",
                parameter="timeout",
            )
        deadline = min(deadline, trace.start + timeout / 1e6)
    return servable.parse_params(head), deadline


def _inputs(servable: Servable, inputs: list[Tensor]) -> tuple[str, list[bytes | np.ndarray]]:
    """The request's images (encoded bytes, or rows of the model's own input)."""
    model = _is_model(servable)
    if model:
        tname, tdtype, tshape = _tensor_input(servable)
        takes = (
            f"{IMAGE_INPUT} (BYTES, shape [N] or [N,1]: encoded images) or {tname} "
            f"({tdtype}, shape {[-1, *tshape]})"
        )
    else:
        takes = f"{IMAGE_INPUT} (BYTES, shape [N] or [N,1]: encoded images)"
    if len(inputs) != 1:
        got = ", ".join(repr(t.name) for t in inputs) or "none"
        raise BadRequest(f"inputs: send exactly one input, {takes}; got {got}", field="inputs")
    t = inputs[0]
    for key in t.parameters:
        if key.startswith("shared_memory"):
            raise BadRequest(f"input {t.name!r}: shared memory is not supported", field=t.name)
    shape = list(t.shape)
    if t.datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise BadRequest(
                f"input {t.name!r}: BYTES images need shape [N] or [N,1] with N >= 1, got {shape}",
                field=t.name,
            )
        items: list[bytes | np.ndarray] = list(t.data)
        if len(items) != shape[0] or not all(isinstance(x, bytes) for x in items):
            raise BadRequest(
                f"input {t.name!r}: expected {shape[0]} byte strings, got {len(items)}",
                field=t.name,
            )
    elif not model:
        raise BadRequest(
            f"input {t.name!r}: {servable.name} is a pipeline and takes {takes}; got {t.datatype}",
            field=t.name,
        )
    else:
        if t.name != tname:
            raise BadRequest(
                f"unknown input {t.name!r}; {servable.name} takes {takes}", field=t.name
            )
        if t.datatype != tdtype:
            raise BadRequest(
                f"input {t.name!r}: datatype {t.datatype}, {servable.name} takes {tdtype}",
                field=t.name,
                expected_datatype=tdtype,
            )
        if len(shape) != len(tshape) + 1 or tuple(shape[1:]) != tshape or shape[0] < 1:
            raise BadRequest(
                f"input {t.name!r}: shape {shape}, {servable.name} takes [N, "
                f"{', '.join(map(str, tshape))}] with N >= 1",
                field=t.name,
                expected_shape=[-1, *tshape],
            )
        arr = t.data
        if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
            raise BadRequest(f"input {t.name!r}: data does not match shape {shape}", field=t.name)
        items = [arr[i] for i in range(shape[0])]
    limit = _max_images(servable)
    if limit is not None and len(items) > limit:
        raise BadRequest(
            f"input {t.name!r}: {len(items)} images; {servable.name} admits at most {limit} "
            "at once (max_queue): split the request",
            field=t.name,
            max_images=limit,
        )
    return t.name, items


def _max_images(servable: Servable) -> int | None:
    admission = getattr(servable, "admission", None)
    return getattr(admission, "max_queue", None)


def _requested(servable: Servable, outputs: list[RequestedOutput] | None) -> list[RequestedOutput]:
    table = output_table(servable)
    if outputs is None:
        return [RequestedOutput(name) for name in table]
    seen: set[str] = set()
    for out in outputs:
        spec = table.get(out.name)
        if spec is None:
            raise BadRequest(
                f"unknown output {out.name!r}; {servable.name} has: {', '.join(table)}",
                field=out.name,
                outputs=list(table),
            )
        if out.name in seen:
            raise BadRequest(f"output {out.name!r} requested twice", field=out.name)
        seen.add(out.name)
        for key in out.parameters:
            if key.startswith("shared_memory"):
                raise BadRequest(
                    f"output {out.name!r}: shared memory is not supported", field=out.name
                )
        k = out.classification
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadRequest(
                f"output {out.name!r}: classification must be a count >= 0, got {k!r}",
                field=out.name,
            )
        if k and spec.datatype in ("BYTES", "BOOL"):
            raise BadRequest(
                f"output {out.name!r}: classification needs a numeric output, it is "
                f"{spec.datatype}",
                field=out.name,
            )
    return outputs


async def _predict_all(
    servable: Servable,
    input_name: str,
    items: list[bytes | np.ndarray],
    trace: Trace,
    deadline: float,
    params: dict[str, Any],
) -> list[Prediction]:
    """The N images as N concurrent requests of the core; the first failure (lowest index)
    cancels the rest and answers the request."""
    traces = [Trace(start=trace.last) for _ in items]
    failed: dict[int, BaseException] = {}

    async def one(i: int) -> Prediction:
        try:
            return await servable.predict(items[i], traces[i], deadline, dict(params))
        except Exception as e:
            failed[i] = e
            raise

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(i)) for i in range(len(items))]
    except BaseExceptionGroup:
        if not failed:
            raise
        i = min(failed)
        error = failed[i]
        if len(items) > 1 and isinstance(error, RequestError) and error.args:
            error.args = (f"{input_name}[{i}]: {error.args[0]}", *error.args[1:])
        raise error from None
    finally:
        _merge(trace, traces)
    return [t.result() for t in tasks]


def _merge(trace: Trace, traces: list[Trace]) -> None:
    """The request's trace takes the stages of the image that finished last."""
    if not traces:
        return
    slowest = max(traces, key=lambda t: t.last)
    for stage, seconds in slowest.stages.items():
        trace.add(stage, seconds)
    trace.advance(slowest.last)
    trace.simulated = trace.simulated or any(t.simulated for t in traces)


# --- outputs ----------------------------------------------------------------------------
def _output(servable: Servable, want: RequestedOutput, preds: list[Prediction]) -> Tensor:
    arr = _stacked(servable, want.name, preds)
    if isinstance(arr, list):  # BYTES
        return Tensor(want.name, "BYTES", [len(arr)], arr)
    if want.classification:
        return _classification(servable, want.name, arr, want.classification)
    return Tensor(want.name, datatype_of(arr.dtype), list(arr.shape), arr)


def _stacked(servable: Servable, name: str, preds: list[Prediction]) -> np.ndarray | list[bytes]:
    if not _is_model(servable):
        return [encode_result(p.result)[0] for p in preds]
    names = list(servable.output_names)  # type: ignore[attr-defined]
    if name in names:
        j = names.index(name)
        return np.stack([np.asarray(p.outputs[j]) for p in preds])  # type: ignore[index]
    if servable.task == "detect":
        return _detections(name, [p.result["detections"] for p in preds])
    key = {"segment": "mask", "depth": "depth", "embed": "embedding"}[servable.task]
    maps = [np.asarray(p.result[key]) for p in preds]
    sizes = {m.shape for m in maps}
    if len(sizes) > 1:
        got = ", ".join(f"{m.shape[1]}x{m.shape[0]}" for m in maps)
        raise BadRequest(
            f"output {name!r}: the images differ in size ({got}) and a {key} map is at the "
            f"image's size; send images of one size, or one per request, or ask for the raw "
            f"outputs ({', '.join(names)})",
            field=name,
        )
    return np.stack(maps)


_DETECTION_FIELDS = {"boxes": np.float32, "scores": np.float32, "labels": np.int64}


def _detections(name: str, per_image: list[list[dict]]) -> np.ndarray:
    n = len(per_image)
    if name == "count":
        return np.array([len(d) for d in per_image], dtype=np.int32)
    k = max((len(d) for d in per_image), default=0)
    dtype = _DETECTION_FIELDS[name]
    out = np.zeros((n, k, 4) if name == "boxes" else (n, k), dtype=dtype)
    for i, dets in enumerate(per_image):
        for j, d in enumerate(dets):
            if name == "boxes":
                out[i, j] = d["box"]
            elif name == "scores":
                out[i, j] = d["score"]
            else:
                out[i, j] = d["index"]
    return out


def _classification(servable: Servable, name: str, arr: np.ndarray, k: int) -> Tensor:
    """Triton's classification strings: top ``k`` values of each image's row."""
    rows = arr.reshape(arr.shape[0], -1)
    labels: list[str] = list(getattr(getattr(servable, "meta", None), "labels", []) or [])
    if rows.shape[1] != len(labels):
        labels = []  # labels name one element per class, not this output's elements
    k = min(k, rows.shape[1])
    floating = np.issubdtype(rows.dtype, np.floating)
    data: list[bytes] = []
    for row in rows:
        for idx in np.argsort(-row.astype(np.float64), kind="stable")[:k]:
            v = row[idx]
            score = f"{float(v):f}" if floating else str(int(v))
            text = f"{score}:{int(idx)}" + (f":{labels[idx]}" if labels else "")
            data.append(text.encode())
    return Tensor(name, "BYTES", [rows.shape[0], k], data)
