"""The server most people write first, as the yardstick for cvserve (benchmarks only).

A Starlette (= FastAPI's core) endpoint that preprocesses each request with PIL and numpy
in the framework's threadpool, exactly as HuggingFace's processors would (full decode,
bicubic shortest-edge resize, center crop, float normalize), and runs onnxruntime at
batch 1 with its default threading. It answers with cvserve's JSON shape and a
Server-Timing header (decode/resize/normalize/infer/postprocess) so that `cvserve bench`
can break its time down the same way.

    python benchmarks/baseline_server.py --onnx MODEL.onnx --name resnet50 --port 8001
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import onnxruntime as ort
import uvicorn
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cvserve.trace import format_server_timing

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_app(onnx_path: str, name: str) -> Starlette:
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def handle(data: bytes) -> tuple[dict, dict]:
        t0 = time.perf_counter()
        im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        t1 = time.perf_counter()
        w, h = im.size
        rw, rh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
        im = im.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - 224) // 2, (rh - 224) // 2
        im = im.crop((left, top, left + 224, top + 224))
        t2 = time.perf_counter()
        x = ((np.asarray(im) / 255.0 - MEAN) / STD).astype(np.float32).transpose(2, 0, 1)[None]
        t3 = time.perf_counter()
        logits = session.run(None, {input_name: x})[0][0]
        t4 = time.perf_counter()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:5]
        result = {
            "model": name,
            "task": "classify",
            "image_size": [w, h],
            "batch_size": 1,
            "top_k": [{"index": int(i), "label": f"class_{i}", "score": float(p[i])} for i in top],
        }
        t5 = time.perf_counter()
        stages = {"decode": t1 - t0, "resize": t2 - t1, "normalize": t3 - t2,
                  "infer": t4 - t3, "postprocess": t5 - t4}  # fmt: skip
        return result, stages

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        data = await request.body()
        t1 = time.perf_counter()
        result, stages = await run_in_threadpool(handle, data)
        body = json.dumps(result).encode()
        total = time.perf_counter() - t0
        timing = {"recv": t1 - t0, **stages}
        timing["queue"] = max(0.0, total - sum(timing.values()))  # threadpool wait + hops
        return Response(body, media_type="application/json",
                        headers={"Server-Timing": format_server_timing(timing)})  # fmt: skip

    async def ready(request: Request) -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    return Starlette(
        routes=[
            Route(f"/v1/models/{name}:predict", predict, methods=["POST"]),
            Route("/readyz", ready),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onnx", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args()
    uvicorn.run(make_app(a.onnx, a.name), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
