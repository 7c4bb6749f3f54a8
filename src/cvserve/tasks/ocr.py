"""OCR as a two-DNN pipeline (PP-OCRv4: DB text detector, then a CTC recognizer),
written as steps on numpy arrays so a server can put a broker between the stages.

Each step is written once, here, and both the reference pipeline below and the server's
stages (``cvserve.serving.pipelines.ocr``) call it:

- ``detect``, stage A, per image: ``det_preprocess`` -> detector -> ``db_postprocess``
  -> ``crop_text_regions`` (fan-out: one image -> N crops, N = len(boxes)).
- ``recognize``, stage B, per batch of crops: optionally ``cls_preprocess`` -> angle
  classifier -> ``cls_postprocess``; then ``plan_batches``/``rec_preprocess`` ->
  recognizer -> ``ctc_decode``.
- ``join_lines``, per request.

The steps get their DNN calls as plain callables (``Infer``) and never open a model file:
sessions, threads and devices are the caller's wiring. Each step reports the seconds its
sub-steps took under the trace's stage names, so a server charges them without timing
the step again. ``OcrReference`` runs the steps in one process; it is what the tests
compare against RapidOCR 1.4.4, whose models (and defaults) these are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from cvserve.trace import Trace

if TYPE_CHECKING:
    from cvserve.models.ocr_files import OcrModelFiles

__all__ = [
    "DetBoxes",
    "DetConfig",
    "DetInput",
    "DetMeta",
    "Detected",
    "Infer",
    "Line",
    "OcrConfig",
    "OcrModels",
    "OcrReference",
    "OcrResult",
    "RecConfig",
    "Recognized",
    "StageSpec",
    "cls_postprocess",
    "cls_preprocess",
    "crop_text_regions",
    "ctc_decode",
    "ctc_labels",
    "db_postprocess",
    "describe_stages",
    "detect",
    "det_input_size",
    "det_preprocess",
    "join_lines",
    "order_points_clockwise",
    "padding_fraction",
    "plan_batches",
    "reading_order",
    "rec_preprocess",
    "rec_width",
    "recognize",
    "unclip",
]

#: One DNN call: an input batch -> the model's output (PP-OCR models have one). Made
#: outside ``tasks/`` (an onnxruntime session, a simulated device, a test double).
Infer = Callable[[np.ndarray], np.ndarray]


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


# --- the steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """Stage A's result for one image: its text boxes in reading order, one crop per box
    (same order), and the seconds spent per trace stage (resize, infer, postprocess)."""

    boxes: DetBoxes
    crops: list[np.ndarray]
    stages: dict[str, float]


def detect(rgb: np.ndarray, det: Infer, cfg: DetConfig) -> Detected:
    """Text regions of one upright RGB image (H, W, 3) uint8, cut out for recognition.

    ``det_preprocess`` resizes and normalizes in one pass and is charged to ``resize``;
    box finding and cutting the crops are ``postprocess``.
    """
    trace = Trace()
    det_in = det_preprocess(rgb, cfg)
    trace.mark("resize")
    prob = det(det_in.tensor[None])
    trace.mark("infer")
    boxes = db_postprocess(prob, det_in.meta, cfg)
    crops = crop_text_regions(det_in.image, boxes.work_boxes)
    trace.mark("postprocess")
    return Detected(boxes=boxes, crops=crops, stages=trace.stages)


@dataclass(frozen=True)
class Recognized:
    """Stage B's result for a batch of crops: (text, score) per crop in the given order,
    the number of recognizer calls, and the seconds spent per trace stage (resize:
    building the classifier and recognizer inputs; infer; postprocess: turning crops
    upright and CTC decoding)."""

    texts: list[tuple[str, float]]
    batches: int
    stages: dict[str, float]


def recognize(
    crops: Sequence[np.ndarray],
    rec: Infer,
    labels: Sequence[str],
    cfg: RecConfig,
    cls: Infer | None = None,
) -> Recognized:
    """Read each crop: with ``cfg.use_cls`` the angle classifier ``cls`` first turns
    upside-down crops upright, then the recognizer ``rec`` reads crops of similar aspect
    ratio together (``plan_batches``: little padding) and ``ctc_decode`` maps its output
    to text with ``labels`` (``ctc_labels`` of the dictionary). ``crops`` may come from
    many images; the input list is not changed."""
    trace = Trace()
    crops = list(crops)
    if cfg.use_cls:
        if cls is None:
            raise ValueError("cfg.use_cls is set but no angle classifier was given")
        for idx in plan_batches(crops, cfg.cls_batch_size):
            batch = [crops[i] for i in idx]
            x = cls_preprocess(batch, cfg)
            trace.mark("resize")
            probs = cls(x)
            trace.mark("infer")
            for i, crop in zip(idx, cls_postprocess(probs, batch, cfg)[0], strict=True):
                crops[i] = crop
            trace.mark("postprocess")
    texts: list[tuple[str, float]] = [("", 0.0)] * len(crops)
    batches = plan_batches(crops, cfg.batch_size)
    for idx in batches:
        x = rec_preprocess([crops[i] for i in idx], cfg)
        trace.mark("resize")
        out = rec(x)
        trace.mark("infer")
        for i, res in zip(idx, ctc_decode(out, labels), strict=True):
            texts[i] = res
        trace.mark("postprocess")
    return Recognized(texts=texts, batches=len(batches), stages=trace.stages)


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


# --- the reference wiring: both stages in one process ------------------------------------


@dataclass(frozen=True)
class OcrModels:
    """The DNN calls the reference pipeline needs, made by whoever owns the runtime
    (``cvserve.serving.pipelines.ocr.load_ocr_models`` for the packaged models)."""

    det: Infer
    rec: Infer
    labels: Sequence[str]  # the recognizer's classes: ``ctc_labels(dictionary)``
    cls: Infer | None = None  # needed when ``RecConfig.use_cls``


@dataclass(frozen=True)
class OcrResult:
    """One image's lines and what each stage did (``recognized`` is None when nothing
    was detected: stage B never ran, as on a server)."""

    lines: list[Line]
    detected: Detected
    recognized: Recognized | None


class OcrReference:
    """Stage A then stage B on one image in one process, no broker: the reference that
    the tests hold against RapidOCR, and the server against."""

    def __init__(self, models: OcrModels, cfg: OcrConfig = OcrConfig()) -> None:
        self.models = models
        self.cfg = cfg

    def run(self, rgb: np.ndarray) -> OcrResult:
        """OCR one upright RGB image (H, W, 3) uint8, with each stage's record."""
        m = self.models
        found = detect(np.asarray(rgb), m.det, self.cfg.det)
        if not found.crops:
            return OcrResult(lines=[], detected=found, recognized=None)
        read = recognize(found.crops, m.rec, m.labels, self.cfg.rec, m.cls)
        lines = join_lines(found.boxes, read.texts, self.cfg.rec.text_score)
        return OcrResult(lines=lines, detected=found, recognized=read)

    def __call__(self, rgb: np.ndarray) -> list[Line]:
        """The lines of one upright RGB image, in reading order."""
        return self.run(rgb).lines


# --- what a server needs to know about the stages ----------------------------------------


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


def describe_stages(files: OcrModelFiles, cfg: OcrConfig = OcrConfig()) -> dict[str, StageSpec]:
    """The stages in pipeline order: det (per image), cls (per crop, when enabled) and
    rec (per crop). One image yields one crop per detected box (``len(DetBoxes)``: 0 for
    a photo without text, hundreds for a dense page; at most ``det.max_candidates``).
    ``files`` says where the models are (``ocr_model_files()`` for the packaged ones)."""
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
