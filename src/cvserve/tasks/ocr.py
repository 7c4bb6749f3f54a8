"""OCR as a two-DNN pipeline (PP-OCRv4: DB text detector, then a CTC recognizer),
written as pure steps on numpy arrays so a server can put a broker between the stages.

Stage A, per image (``det``): ``det_preprocess`` -> detector -> ``db_postprocess`` ->
``crop_text_regions`` (fan-out: one image -> N crops, N = len(boxes)).
Stage B, per crop (``rec``): optionally ``cls_preprocess`` -> angle classifier ->
``cls_postprocess``; then ``plan_batches``/``rec_preprocess`` -> recognizer ->
``ctc_decode``. Join, per request: ``join_lines``.

``OcrPipeline`` wires the steps in one process; it is the reference wiring and what the
tests compare against RapidOCR 1.4.4, whose models (and defaults) these are.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.models.ocr_files import OcrModelFiles, ocr_model_files, read_dictionary
from cvserve.runtime.onnx import OrtOptions, OrtRuntime
from cvserve.tasks.ocr_det import (
    DetBoxes,
    DetConfig,
    DetInput,
    DetMeta,
    db_postprocess,
    det_input_size,
    det_preprocess,
    order_points_clockwise,
    reading_order,
    unclip,
)
from cvserve.tasks.ocr_rec import (
    RecConfig,
    cls_postprocess,
    cls_preprocess,
    crop_text_regions,
    ctc_decode,
    ctc_labels,
    padding_fraction,
    plan_batches,
    rec_preprocess,
    rec_width,
)

__all__ = [
    "DetBoxes",
    "DetConfig",
    "DetInput",
    "DetMeta",
    "Line",
    "OcrConfig",
    "OcrPipeline",
    "RecConfig",
    "StageSpec",
    "cls_postprocess",
    "cls_preprocess",
    "crop_text_regions",
    "ctc_decode",
    "ctc_labels",
    "db_postprocess",
    "describe_stages",
    "det_input_size",
    "det_preprocess",
    "join_lines",
    "ocr_image",
    "order_points_clockwise",
    "padding_fraction",
    "plan_batches",
    "reading_order",
    "rec_preprocess",
    "rec_width",
    "unclip",
]


@dataclass(frozen=True)
class OcrConfig:
    """All OCR settings; the defaults reproduce RapidOCR 1.4.4 (angle classifier on)."""

    det: DetConfig = field(default_factory=DetConfig)
    rec: RecConfig = field(default_factory=RecConfig)


@dataclass(frozen=True)
class Line:
    """One recognized text line: its box in the original image (4 points, clockwise from
    top-left), text, recognition score (mean CTC probability) and detection score."""

    box: np.ndarray  # (4, 2) float32
    text: str
    score: float
    det_score: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [[round(float(x), 1), round(float(y), 1)] for x, y in self.box],
            "text": self.text,
            "score": round(self.score, 5),
        }


def join_lines(
    boxes: DetBoxes, texts: Sequence[tuple[str, float]], text_score: float = 0.5
) -> list[Line]:
    """One request's detections and per-crop (text, score), in the boxes' (reading)
    order, -> lines; those scoring under ``text_score`` are dropped, as the reference."""
    if len(texts) != len(boxes):
        raise ValueError(f"{len(texts)} recognition results for {len(boxes)} boxes")
    return [
        Line(box=box, text=text, score=float(score), det_score=float(ds))
        for box, ds, (text, score) in zip(boxes.boxes, boxes.scores, texts, strict=True)
        if float(score) >= text_score
    ]


# --- what a server needs to know about the two stages ------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One DNN stage of the OCR pipeline, for the server's model and batcher setup."""

    name: str  # "det" | "cls" | "rec"
    onnx_file: Path
    input_name: str
    input_shape: list[int | None]  # batch first; None where dynamic
    input_dtype: str
    channel_order: str  # the tensors the steps build are BGR (PP-OCR was trained on it)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    unit: str  # what one batch row is: "image" or "crop"
    recommended_batch: int
    notes: str


def describe_stages(
    files: OcrModelFiles | None = None, cfg: OcrConfig = OcrConfig()
) -> dict[str, StageSpec]:
    """The stages in pipeline order: det (per image), cls (per crop, when enabled) and
    rec (per crop). One image yields one crop per detected box (``len(DetBoxes)``: 0 for
    a photo without text, hundreds for a dense page; at most ``det.max_candidates``)."""
    files = files or ocr_model_files()
    half = (0.5, 0.5, 0.5)
    stages = {
        "det": StageSpec(
            name="det",
            onnx_file=files.det,
            input_name="x",
            input_shape=[1, 3, None, None],
            input_dtype="float32",
            channel_order="BGR",
            mean=half,
            std=half,
            unit="image",
            recommended_batch=1,
            notes=(
                "H and W are dynamic multiples of 32 set per image by det_input_size "
                f"(shorter side >= {cfg.det.limit_side_len}). Batch 1: a batch must be padded "
                "to a common size, which costs compute on every smaller image and shifts "
                "the network's view at the padded edges; db_postprocess cuts a padded "
                "map back to meta.input_size if a server does batch same-size images."
            ),
        ),
        "rec": StageSpec(
            name="rec",
            onnx_file=files.rec,
            input_name="x",
            input_shape=[None, 3, cfg.rec.height, None],
            input_dtype="float32",
            channel_order="BGR",
            mean=half,
            std=half,
            unit="crop",
            recommended_batch=cfg.rec.batch_size,
            notes=(
                f"W = rec_width(batch) >= {cfg.rec.min_width}, set by the widest crop; "
                "batch crops of similar aspect ratio (across requests too) so little of "
                "the batch is padding (plan_batches, padding_fraction). Output (B, W/8, "
                "6625) probabilities -> ctc_decode with the dictionary in the ONNX metadata."
            ),
        ),
    }
    if cfg.rec.use_cls:
        stages = {
            "det": stages["det"],
            "cls": StageSpec(
                name="cls",
                onnx_file=files.cls,
                input_name="x",
                input_shape=[None, 3, cfg.rec.cls_height, cfg.rec.cls_width],
                input_dtype="float32",
                channel_order="BGR",
                mean=half,
                std=half,
                unit="crop",
                recommended_batch=cfg.rec.cls_batch_size,
                notes=(
                    "fixed input size, any crops batch freely; tiny (0.6 MB): run it in "
                    "the rec worker just before rec_preprocess rather than as its own hop."
                ),
            ),
            "rec": stages["rec"],
        }
    return stages


# --- the reference wiring --------------------------------------------------------------


class OcrPipeline:
    """The steps run in one process with one onnxruntime session per model."""

    def __init__(
        self,
        files: OcrModelFiles | None = None,
        cfg: OcrConfig = OcrConfig(),
        options: OrtOptions | None = None,
    ) -> None:
        self.files = files or ocr_model_files()
        self.cfg = cfg
        self.det = OrtRuntime(self.files.det, options)
        self.rec = OrtRuntime(self.files.rec, options)
        self.cls = OrtRuntime(self.files.cls, options) if cfg.rec.use_cls else None
        self.labels = ctc_labels(read_dictionary(self.files.rec))

    def __call__(
        self, rgb: np.ndarray, timings: dict[str, list[float]] | None = None
    ) -> list[Line]:
        """OCR one upright RGB image (H, W, 3) uint8. ``timings``, if given, collects the
        seconds each step took, by step name (rec steps once per batch)."""
        times: dict[str, list[float]] = timings if timings is not None else {}
        t = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            times.setdefault(name, []).append(now - t)
            t = now

        cfg = self.cfg
        det_in = det_preprocess(rgb, cfg.det)
        lap("det_preprocess")
        prob = self.det.run(det_in.tensor[None])[0]
        lap("det_infer")
        boxes = db_postprocess(prob, det_in.meta, cfg.det)
        lap("db_postprocess")
        if len(boxes) == 0:
            return []
        crops = crop_text_regions(det_in.image, boxes.work_boxes)
        lap("crop")
        if self.cls is not None:
            crops = list(crops)
            for idx in plan_batches(crops, cfg.rec.cls_batch_size):
                batch = [crops[i] for i in idx]
                probs = self.cls.run(cls_preprocess(batch, cfg.rec))[0]
                for i, crop in zip(idx, cls_postprocess(probs, batch, cfg.rec)[0], strict=True):
                    crops[i] = crop
            lap("cls")
        texts: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        for idx in plan_batches(crops, cfg.rec.batch_size):
            tensor = rec_preprocess([crops[i] for i in idx], cfg.rec)
            lap("rec_preprocess")
            out = self.rec.run(tensor)[0]
            lap("rec_infer")
            for i, res in zip(idx, ctc_decode(out, self.labels), strict=True):
                texts[i] = res
            lap("ctc_decode")
        lines = join_lines(boxes, texts, cfg.rec.text_score)
        lap("join")
        return lines


def ocr_image(rgb: np.ndarray, pipeline: OcrPipeline | None = None) -> list[Line]:
    """OCR one upright RGB image. Without ``pipeline`` the sessions are created for this
    call alone (about 0.2 s); keep an ``OcrPipeline`` to OCR many images."""
    return (pipeline or OcrPipeline())(np.asarray(rgb))
