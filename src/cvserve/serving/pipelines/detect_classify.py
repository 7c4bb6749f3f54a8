"""Detection -> per-object classification: a detector finds objects in the serving
process, each object's crop goes through the broker to a classifier that batches crops of
every request. ``objects`` (the top-scoring detections kept per image) sets how many
items one image fans out into, so the rate mismatch between the stages can be swept.

Built from zoo models (random weights: which boxes win is arbitrary, the cost is real):
``detector`` (default ``yolos-tiny``) and ``classifier`` (default ``resnet18``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from PIL import Image

from cvserve.brokers import Message
from cvserve.config import PIPELINE_DNNS
from cvserve.images.decode import decode
from cvserve.images.preprocess import ImageMeta
from cvserve.images.transforms import normalize_into, resize_crop
from cvserve.serving.pipelines.base import (
    BATCH,
    INFER_S,
    POST_S,
    FanOut,
    StageOptions,
    open_stage_model,
    waited_for_cores,
)
from cvserve.tasks.base import softmax

KIND = "detect-classify"
DEFAULTS = {"detector": "yolos-tiny", "classifier": "resnet18", "objects": 8}


def _param(options: StageOptions, key: str) -> Any:
    return options.params.get(key, DEFAULTS[key])


def _load(name: str, options: StageOptions, stage: str):
    from cvserve.models import store

    meta = store.ensure_built(name, options.cache_dir)
    return meta, open_stage_model(store.model_path(meta, options.cache_dir), options, stage)


class DetectStage:
    """Stage A: image -> top-``objects`` detections -> one classifier-sized crop each."""

    def __init__(self, options: StageOptions) -> None:
        from cvserve.models import store
        from cvserve.tasks.detect import DetectHead

        self.objects = int(_param(options, "objects"))
        if self.objects < 1:
            raise ValueError("objects must be >= 1")
        self.options = options
        self.meta, self.det = _load(_param(options, "detector"), options, "det")
        if self.meta.task != "detect":
            raise ValueError(f"detector {self.meta.name!r} is a {self.meta.task} model")
        # The detector's own head: its family's scoring (softmax or sigmoid) and geometry.
        self.head = DetectHead(self.meta)
        cls_meta = store.ensure_built(_param(options, "classifier"), options.cache_dir)
        self.crop_size = (cls_meta.preprocess.width, cls_meta.preprocess.height)
        self.max_pixels = options.max_pixels

    def run(self, data: bytes) -> FanOut:
        spec = self.meta.preprocess
        x = np.empty((1, *spec.input_shape), np.float32)
        waited_for_cores(self.options)  # forget what a call that raised on this thread left
        t0 = time.perf_counter()
        # The crops need the picture too: decode once, preprocess from the decoded image.
        dec = decode(data, max_pixels=self.max_pixels, backend="pil")
        t1 = time.perf_counter()
        normalize_into(np.asarray(resize_crop(dec.image, dec.orig_size, spec)), x[0], spec)
        t2 = time.perf_counter()
        outputs = self.det.run(x)
        t3 = time.perf_counter()
        meta = ImageMeta(orig_size=dec.orig_size, format=dec.format, reduced=dec.reduced)
        found = self.head.postprocess(
            [o[0] for o in outputs[:2]], meta, threshold=0.0, top_k=self.objects, clip=True
        )["detections"]
        items, boxes = [], []
        for d in found:
            x0, y0, x1, y1 = d["box"]
            box = (
                int(x0),
                int(y0),
                max(int(x0) + 1, int(np.ceil(x1))),
                max(int(y0) + 1, int(np.ceil(y1))),
            )
            crop = dec.image.resize(self.crop_size, Image.Resampling.BILINEAR, box=box)
            items.append({"pixels": np.asarray(crop)})
            boxes.append([round(v, 1) for v in d["box"]])
        t4 = time.perf_counter()
        waited = waited_for_cores(self.options)  # for a core other stages held
        context = {
            "boxes": boxes,
            "det_scores": [d["score"] for d in found],
            "det_labels": [d["index"] for d in found],
        }
        return FanOut(
            items=items, context=context, image_size=dec.orig_size,
            stages={
                "decode": t1 - t0, "resize": t2 - t1, "queue": waited,
                "infer": t3 - t2 - waited, "postprocess": t4 - t3,
            },
            started=t0, finished=t4,
        )  # fmt: skip


class ClassifyStage:
    """Stage B: crops from any requests -> one batched classifier run -> top-1 each."""

    def __init__(self, options: StageOptions) -> None:
        self.options = options
        self.meta, self.rt = _load(_param(options, "classifier"), options, "cls")
        self.spec = self.meta.preprocess
        self.labels = self.meta.labels

    def run(self, messages: list[Message]) -> list[Message]:
        waited_for_cores(self.options)  # forget what a call that raised on this thread left
        t0 = time.perf_counter()
        x = np.empty((len(messages), *self.spec.input_shape), self.spec.dtype)
        for i, m in enumerate(messages):
            normalize_into(m.arrays["pixels"], x[i], self.spec)
        t1 = time.perf_counter()
        logits = self.rt.run(x)[0]
        t2 = time.perf_counter()
        probs = softmax(logits)
        top = probs.argmax(axis=-1)
        post = (t1 - t0) + (time.perf_counter() - t2)
        waited = waited_for_cores(self.options)  # counted in the broker hop by the server
        n = len(messages)
        return [
            m.reply(
                headers={
                    "index": int(k),
                    "score": float(probs[i, k]),
                    "label": self.labels[k] if k < len(self.labels) else f"class_{k}",
                    INFER_S: t2 - t1 - waited,
                    POST_S: post,
                    BATCH: n,
                }
            )  # fmt: skip
            for i, (m, k) in enumerate(zip(messages, top, strict=True))
        ]


class DetectClassifyPipeline:
    kind = KIND
    task = "detect-classify"
    stage_a = "detect"
    stage_b = "classify"
    dnns = PIPELINE_DNNS[KIND]  # config checks per-DNN profiles against these
    params = ()

    def make_stage_a(self, options: StageOptions) -> DetectStage:
        return DetectStage(options)

    def make_stage_b(self, options: StageOptions) -> ClassifyStage:
        return ClassifyStage(options)

    def join(self, context: Any, results: list[Message], **_: Any) -> dict:
        objects = [
            {
                "box": box,
                "det_score": round(ds, 5),
                "det_label": dl,
                "label": r.headers["label"],
                "score": round(float(r.headers["score"]), 5),
            }  # fmt: skip
            for box, ds, dl, r in zip(
                context["boxes"], context["det_scores"], context["det_labels"], results, strict=True
            )
        ]
        return {"objects": objects}

    def describe(self, options: StageOptions) -> dict:
        return {k: _param(options, k) for k in DEFAULTS}
