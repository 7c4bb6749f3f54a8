"""The server most people write first: the yardstick cvserve is compared with.

A Starlette (= FastAPI's core) endpoint that preprocesses each request with PIL and numpy
in the framework's threadpool, as HuggingFace's image processors do (full decode with
EXIF transpose, shortest-edge resize, center crop, float64 normalize), and runs
onnxruntime at batch 1 with its default threading. It answers with cvserve's JSON shape
and a ``Server-Timing`` header (recv/queue/decode/resize/normalize/infer/postprocess/
encode) so that ``cvserve bench`` can break its time down the same way.

    python -m cvserve.study.baseline --onnx MODEL.onnx --name resnet50 --port 8001

The geometry and pixel encoding come from the model's sidecar (``model.json`` beside the
ONNX file in the model store), so any classify model of the store is served as it was
trained; an ONNX file without one gets ImageNet's 256 -> 224 bicubic preprocessing.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import RESAMPLE
from cvserve.models.metadata import ModelMeta
from cvserve.models.store import SIDECAR_FILE
from cvserve.serving.process import ServerProcess

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SPEC",
    "BaselineModel",
    "BaselineProcess",
    "baseline_preprocess",
    "load_model_info",
    "make_app",
]

#: What a user's ONNX file without a sidecar gets: HF's ResNet/ConvNeXt processor at 224
#: (shortest edge 224 / crop_pct 0.875 = 256, center crop 224, bicubic, ImageNet stats).
DEFAULT_SPEC = PreprocessSpec(
    height=224, width=224, resize_shortest=256, interpolation="bicubic"
)  # fmt: skip

DEFAULT_TOP_K = 5


class BadImage(ValueError):
    """The request body is not an image PIL can decode."""


def _preprocess_timed(
    data: bytes, spec: PreprocessSpec
) -> tuple[np.ndarray, tuple[int, int], dict[str, float]]:
    t0 = time.perf_counter()
    try:
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot decode image: {e}") from None
    t1 = time.perf_counter()
    w, h = im.size
    resample = RESAMPLE[spec.interpolation]
    if spec.resize_mode == "shortest_edge_crop":
        s = spec.resize_shortest or max(spec.height, spec.width)
        # HF's get_resize_output_image_size: the long side is truncated, not rounded.
        rw, rh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        im = im.resize((rw, rh), resample)
        left, top = (rw - spec.width) // 2, (rh - spec.height) // 2
        im = im.crop((left, top, left + spec.width, top + spec.height))  # pads with 0 outside
    elif spec.resize_mode == "direct":
        im = im.resize((spec.width, spec.height), resample)
    else:
        raise ValueError(f"the baseline serves classify models; {spec.resize_mode!r} resize")
    t2 = time.perf_counter()
    x = np.asarray(im)
    if spec.channel_order == "BGR":
        x = x[..., ::-1]
    if spec.dtype == "float32":
        x = ((x * spec.rescale - np.array(spec.mean)) / np.array(spec.std)).astype(np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = np.ascontiguousarray(x[None])
    t3 = time.perf_counter()
    return x, (w, h), {"decode": t1 - t0, "resize": t2 - t1, "normalize": t3 - t2}


def baseline_preprocess(data: bytes, spec: PreprocessSpec | None = None) -> np.ndarray:
    """HF-like naive preprocessing of one encoded image: the batch-1 model input.

    Full-resolution decode, EXIF transpose, RGB; resize of the whole image with the
    spec's filter (shortest edge to ``resize_shortest``, long side truncated) then a
    center crop with ``(size - crop) // 2`` offsets (or a direct resize); rescale and
    ``(x - mean) / std`` in float64, cast to float32 (raw uint8 for ``dtype='uint8'``);
    shape ``(1, 3, H, W)`` for NCHW. ``spec`` defaults to :data:`DEFAULT_SPEC`.
    Raises :class:`BadImage` for bytes PIL cannot decode.
    """
    return _preprocess_timed(data, spec or DEFAULT_SPEC)[0]


def load_model_info(
    onnx_path: str | Path, meta_path: str | Path | None = None
) -> tuple[PreprocessSpec, list[str]]:
    """The preprocessing spec and labels of ``onnx_path`` from its store sidecar
    (``meta_path``, else ``model.json`` beside the file); :data:`DEFAULT_SPEC` and no
    labels when there is none."""
    sidecar = Path(meta_path) if meta_path else Path(onnx_path).parent / SIDECAR_FILE
    if not sidecar.is_file():
        if meta_path:
            raise FileNotFoundError(f"no model sidecar at {sidecar}")
        log.info("no sidecar beside %s: using ImageNet 256->224 preprocessing", onnx_path)
        return DEFAULT_SPEC, []
    meta = ModelMeta.load(sidecar)
    if meta.task != "classify":
        raise ValueError(f"the baseline serves classify models; {meta.name} is {meta.task}")
    return meta.preprocess, list(meta.labels)


class BaselineModel:
    """One ONNX classifier with naive preprocessing: one method per stage, so that the
    baseline server and the peers (LitServe, Ray Serve) run exactly the same code.

    Without ``spec`` the spec and labels come from the sidecar (see :func:`load_model_info`).
    """

    def __init__(
        self,
        onnx_path: str | Path,
        name: str,
        spec: PreprocessSpec | None = None,
        labels: list[str] | None = None,
        meta_path: str | Path | None = None,
    ) -> None:
        import onnxruntime as ort

        if spec is None:
            spec, found = load_model_info(onnx_path, meta_path)
            labels = found if labels is None else labels
        self.name = name
        self.spec = spec
        self.labels = labels or []
        self.onnx_path = str(onnx_path)
        self.session = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def preprocess(self, data: bytes) -> tuple[np.ndarray, tuple[int, int], dict[str, float]]:
        """``(input batch of 1, upright image (w, h), decode/resize/normalize seconds)``."""
        return _preprocess_timed(data, self.spec)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0][0]

    def postprocess(
        self, logits: np.ndarray, image_size: tuple[int, int], top_k: int = DEFAULT_TOP_K
    ) -> dict[str, Any]:
        """cvserve's classify answer: softmax, the ``top_k`` best labels."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[: max(1, min(top_k, p.size))]
        return {
            "model": self.name,
            "task": "classify",
            "image_size": list(image_size),
            "batch_size": 1,
            "top_k": [{"index": int(i), "label": self._label(int(i)), "score": float(p[i])}
                      for i in top],
        }  # fmt: skip

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"

    def handle(self, data: bytes, top_k: int = DEFAULT_TOP_K) -> tuple[dict, dict[str, float]]:
        """Preprocess, infer and postprocess one image: ``(answer, stage seconds)``."""
        x, size, stages = self.preprocess(data)
        t0 = time.perf_counter()
        logits = self.infer(x)
        t1 = time.perf_counter()
        result = self.postprocess(logits, size, top_k)
        stages["infer"] = t1 - t0
        stages["postprocess"] = time.perf_counter() - t1
        return result, stages

    def describe(self, server: str) -> dict[str, Any]:
        """What ``GET /v1/models/{name}`` answers (the fields cvserve's own answer has)."""
        inp = self.session.get_inputs()[0]
        return {
            "name": self.name,
            "model": self.name,
            "task": "classify",
            "ready": True,
            "server": server,
            "input": {"name": inp.name, "shape": inp.shape, "dtype": self.spec.dtype},
            "outputs": [o.name for o in self.session.get_outputs()],
            "preprocess": self.spec.to_dict(),
            "decoder": "pil-full",
            "labels": len(self.labels),
            "source": self.onnx_path,
            "batching": {"max_batch_size": 1, "max_delay_ms": 0, "instances": 1},
        }


def top_k_param(query: Any) -> int:
    """``?top_k=`` as cvserve reads it (1..1000); ValueError otherwise."""
    raw = query.get("top_k")
    if raw is None:
        return DEFAULT_TOP_K
    k = int(raw)
    if not 1 <= k <= 1000:
        raise ValueError(f"top_k must be an integer in 1..1000, got {raw}")
    return k


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"kind": kind, "message": message}}).encode()


def make_app(onnx_path: str | Path, name: str, meta_path: str | Path | None = None):
    """The baseline's Starlette app serving ``onnx_path`` as model ``name`` (preprocessing
    and labels from its sidecar, see :func:`load_model_info`)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from cvserve.trace import format_server_timing

    model = BaselineModel(onnx_path, name, meta_path=meta_path)

    def json_response(body: bytes, status: int = 200, timing: dict | None = None) -> Response:
        headers = {"Server-Timing": format_server_timing(timing or {})}
        return Response(body, status, media_type="application/json", headers=headers)

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        if request.path_params["model"] != name:
            msg = f"no model named {request.path_params['model']!r}; serving: {name}"
            return json_response(error_body("not_found", msg), 404)
        data = await request.body()
        t1 = time.perf_counter()
        try:
            top_k = top_k_param(request.query_params)
            result, stages = await run_in_threadpool(model.handle, data, top_k)
        except ValueError as e:  # BadImage, or a bad top_k
            return json_response(error_body("bad_request", str(e)), 400)
        t2 = time.perf_counter()
        body = json.dumps(result).encode()
        timing = {"recv": t1 - t0, **stages, "encode": time.perf_counter() - t2}
        timing["queue"] = max(0.0, time.perf_counter() - t0 - sum(timing.values()))
        return json_response(body, timing=timing)  # queue: threadpool wait and hops

    async def ready(request: Request) -> Response:
        return json_response(json.dumps({"ready": True, "models": [name]}).encode())

    async def list_models(request: Request) -> Response:
        return json_response(json.dumps({"models": [model.describe("baseline")]}).encode())

    async def show_model(request: Request) -> Response:
        if request.path_params["model"] != name:
            msg = f"no model named {request.path_params['model']!r}"
            return json_response(error_body("not_found", msg), 404)
        return json_response(json.dumps(model.describe("baseline")).encode())

    return Starlette(
        routes=[
            Route("/v1/models/{model}:predict", predict, methods=["POST"]),
            Route("/v1/models", list_models),
            Route("/v1/models/{model}", show_model),
            Route("/readyz", ready),
            Route("/healthz", ready),
        ]
    )


class BaselineProcess(ServerProcess):
    """The baseline server in a child process on a free port (``with`` starts it and
    waits for ``/readyz``; stopping sends SIGTERM)."""

    #: ``python -m`` this, with these arguments first (the peers reuse the class)
    command: tuple[str, ...] = ("cvserve.study.baseline",)

    def __init__(
        self,
        onnx: str | Path,
        name: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        meta: str | Path | None = None,
    ) -> None:
        super().__init__([], port=port, host=host)
        self.args = [sys.executable, "-m", *self.command, "--onnx", str(onnx),
                     "--name", name, "--host", host, "--port", str(self.port)]  # fmt: skip
        if meta is not None:
            self.args += ["--meta", str(meta)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--onnx", required=True, help="the model file")
    p.add_argument("--name", required=True, help="the model name in the URL")
    p.add_argument("--meta", default=None, help="its sidecar (default: model.json beside it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args(argv)
    import uvicorn

    app = make_app(a.onnx, a.name, a.meta)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
