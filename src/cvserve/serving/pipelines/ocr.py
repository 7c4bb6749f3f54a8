"""The OCR pipeline: text detection in the serving process, recognition behind a broker.

Stage ``det``: decode -> DB detector -> boxes -> one crop per text region (fan-out).
Stage ``rec``: angle classifier + recognizer over crops from any requests, batched by
aspect ratio; CTC greedy decoding. Join: lines in reading order.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cvserve.brokers import Message
from cvserve.images.decode import decode
from cvserve.serving.pipelines.base import BATCH, INFER_S, POST_S, FanOut, StageOptions

KIND = "ocr"


def _options(options: StageOptions):
    from cvserve.runtime import OrtOptions

    return OrtOptions(intra_op_threads=options.intra_op_threads)


def _ocr_config(options: StageOptions):
    from dataclasses import replace

    from cvserve.tasks.ocr import OcrConfig

    cfg = OcrConfig()
    if "use_cls" in options.params:
        cfg = replace(cfg, rec=replace(cfg.rec, use_cls=bool(options.params["use_cls"])))
    return cfg


class OcrDetStage:
    """Stage A: one image in, one crop per detected text region out."""

    def __init__(self, options: StageOptions) -> None:
        from cvserve.models.ocr_files import ocr_model_files
        from cvserve.runtime import OrtRuntime

        self.cfg = _ocr_config(options)
        self.max_pixels = options.max_pixels
        self.det = OrtRuntime(ocr_model_files().det, _options(options))

    def run(self, data: bytes) -> FanOut:
        from cvserve.tasks.ocr import crop_text_regions, db_postprocess, det_preprocess

        t0 = time.perf_counter()
        rgb = np.asarray(decode(data, max_pixels=self.max_pixels, backend="pil").image)
        t1 = time.perf_counter()
        det_in = det_preprocess(rgb, self.cfg.det)
        t2 = time.perf_counter()
        prob = self.det.run(det_in.tensor[None])[0]
        t3 = time.perf_counter()
        boxes = db_postprocess(prob, det_in.meta, self.cfg.det)
        crops = crop_text_regions(det_in.image, boxes.work_boxes) if len(boxes) else []
        t4 = time.perf_counter()
        h, w = rgb.shape[:2]
        return FanOut(
            items=[{"crop": np.ascontiguousarray(c)} for c in crops],
            context=boxes,
            image_size=(w, h),
            stages={"decode": t1 - t0, "resize": t2 - t1, "infer": t3 - t2, "postprocess": t4 - t3},
            started=t0,
            finished=t4,
        )


class OcrRecStage:
    """Stage B: crops from any requests in, (text, score) per crop out."""

    def __init__(self, options: StageOptions) -> None:
        from cvserve.models.ocr_files import ocr_model_files, read_dictionary
        from cvserve.runtime import OrtRuntime
        from cvserve.tasks.ocr import ctc_labels

        files = ocr_model_files()
        self.cfg = _ocr_config(options)
        self.rec = OrtRuntime(files.rec, _options(options))
        self.cls = OrtRuntime(files.cls, _options(options)) if self.cfg.rec.use_cls else None
        self.labels = ctc_labels(read_dictionary(files.rec))

    def run(self, messages: list[Message]) -> list[Message]:
        from cvserve.tasks.ocr import (
            cls_postprocess,
            cls_preprocess,
            ctc_decode,
            plan_batches,
            rec_preprocess,
        )

        rc = self.cfg.rec
        crops = [m.arrays["crop"] for m in messages]
        infer = post = 0.0
        t = time.perf_counter()
        if self.cls is not None:
            for idx in plan_batches(crops, rc.cls_batch_size):
                batch = [crops[i] for i in idx]
                x = cls_preprocess(batch, rc)
                t1 = time.perf_counter()
                probs = self.cls.run(x)[0]
                t2 = time.perf_counter()
                for i, crop in zip(idx, cls_postprocess(probs, batch, rc)[0], strict=True):
                    crops[i] = crop
                infer += t2 - t1
        texts: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for idx in plan_batches(crops, rc.batch_size):
            x = rec_preprocess([crops[i] for i in idx], rc)
            t1 = time.perf_counter()
            out = self.rec.run(x)[0]
            t2 = time.perf_counter()
            infer += t2 - t1
            for i, res in zip(idx, ctc_decode(out, self.labels), strict=True):
                texts[i] = res
        post = time.perf_counter() - t - infer
        n = len(messages)
        return [
            m.reply(
                headers={
                    "text": text,
                    "score": float(score),
                    INFER_S: infer,
                    POST_S: post,
                    BATCH: n,
                }
            )  # fmt: skip
            for m, (text, score) in zip(messages, texts, strict=True)
        ]


class OcrPipeline:
    kind = KIND
    task = "ocr"
    stage_a = "det"
    stage_b = "rec"
    params = ()

    def make_stage_a(self, options: StageOptions) -> OcrDetStage:
        return OcrDetStage(options)

    def make_stage_b(self, options: StageOptions) -> OcrRecStage:
        return OcrRecStage(options)

    def join(self, context: Any, results: list[Message], **_: Any) -> dict:
        from cvserve.tasks.ocr import join_lines

        cfg = _ocr_config(StageOptions())
        texts = [
            (str(r.headers.get("text", "")), float(r.headers.get("score", 0.0))) for r in results
        ]
        lines = join_lines(context, texts, cfg.rec.text_score) if results else []
        return {"lines": [ln.to_dict() for ln in lines], "regions": len(results)}

    def describe(self, options: StageOptions) -> dict:
        from cvserve.tasks.ocr import describe_stages

        stages = describe_stages(cfg=_ocr_config(options))
        return {
            name: {"onnx_file": str(s.onnx_file), "input_shape": s.input_shape, "unit": s.unit}
            for name, s in stages.items()
        }
