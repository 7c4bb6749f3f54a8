"""The segmentation server a user writes first: FastAPI + HuggingFace's image processor and
its own ``post_process_semantic_segmentation``, the yardstick for cvserve's segmentation
in ``benchmarks/heavy.py``.

Per request, in FastAPI's threadpool (a plain ``def`` endpoint): Pillow decode (EXIF
orientation applied, RGB), ``SegformerImageProcessor`` (built from arguments: the
settings of cvserve's zoo entry, which mirror the HF checkpoint's
``preprocessor_config.json``; segformer-b0: 512x512 direct bilinear resize, ImageNet
mean/std), onnxruntime at batch 1 on the SAME ONNX file ``cvserve serve --model NAME``
serves (found through cvserve's model store, built there if missing), then
``processor.post_process_semantic_segmentation(outputs, target_sizes=[(H, W)])``
(torch: bilinear upsampling of every class's logits to the photo's size, argmax). It
answers what cvserve's JSON answer carries for a mask: the class map at the photo's size
as a PNG (``{"png_base64", "dtype", "shape", "encoding": "png8"}``, Pillow's default PNG
settings) and the fraction of the photo each class covers.

    python benchmarks/baselines/segment_server.py --model segformer-b0 --port 8003
    curl --data-binary @photo.jpg -H 'content-type: image/jpeg' http://127.0.0.1:8003/segment

``POST /v1/models/{NAME}:predict`` is the same endpoint under cvserve's route, so that
``cvserve bench`` (which posts to that route) can load this server as it loads cvserve.
"""

from __future__ import annotations

import argparse
import base64
import io
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException
from PIL import Image, ImageOps, UnidentifiedImageError


def image_processor(model: str) -> Any:
    """The HF image processor of zoo model ``model``, built from its zoo settings."""
    from cvserve.models import torchvision_compat

    torchvision_compat.install()  # transformers imports torchvision where one is installed
    import transformers

    from cvserve.models.hf import processor_class
    from cvserve.models.zoo import ZOO

    entry = ZOO[model]
    # transformers 5 names the PIL/numpy backend "<Name>Pil" (the plain name wants
    # torchvision and falls back to it, with a warning, when that is missing).
    return processor_class(transformers, entry.processor_class)(**entry.processor)


def mask_png(mask: np.ndarray) -> dict[str, Any]:
    """A class map as cvserve's JSON answer describes one (8-bit PNG, or 16-bit above 255)."""
    small = int(mask.max(initial=0)) <= 255
    arr = mask.astype(np.uint8 if small else np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return {
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "encoding": "png8" if small else "png16",
        "png_base64": base64.b64encode(buf.getvalue()).decode("ascii"),
    }


def create_app(model: str, cache_dir: str | None = None) -> FastAPI:
    """The app serving zoo segmentation model ``model`` from cvserve's store."""
    import onnxruntime as ort
    import torch

    from cvserve.models import store

    meta = store.ensure_built(model, cache_dir)
    if meta.task != "segment":
        raise SystemExit(f"{model} is a {meta.task} model, not a segmentation one")
    processor = image_processor(model)
    session = ort.InferenceSession(
        str(store.model_path(meta, cache_dir)), providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    labels = list(meta.labels)
    app = FastAPI(title=f"{model} baseline")

    def segment(body: bytes = Body(..., media_type="image/jpeg")) -> dict:
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(body))).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise HTTPException(400, f"cannot decode image: {e}") from None
        width, height = image.size
        pixels = processor(images=image, return_tensors="np")["pixel_values"]
        logits = session.run(None, {input_name: pixels.astype(np.float32)})[0]
        outputs = SimpleNamespace(logits=torch.from_numpy(logits))
        class_map = processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(height, width)]
        )[0].numpy()
        counts = np.bincount(class_map.reshape(-1), minlength=len(labels))
        present = np.nonzero(counts)[0]
        present = present[np.argsort(-counts[present], kind="stable")]
        return {
            "model": model,
            "task": "segment",
            "image_size": [width, height],
            "mask": mask_png(class_map),
            "classes": [
                {
                    "index": int(i),
                    "label": labels[i] if i < len(labels) else f"class_{i}",
                    "fraction": float(counts[i] / class_map.size),
                }
                for i in present
            ],
        }

    app.post("/segment")(segment)
    app.post(f"/v1/models/{model}:predict")(segment)

    from _app import add_readyz  # beside this script

    return add_readyz(app)


def _flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="segformer-b0", help="a zoo segmentation model")
    p.add_argument("--cache-dir", default=None, help="cvserve's model store")


def main(argv: list[str] | None = None) -> None:
    from _app import serve_main  # beside this script

    serve_main(__doc__, 8003, lambda a: create_app(a.model, a.cache_dir), argv, _flags)


if __name__ == "__main__":
    main()
