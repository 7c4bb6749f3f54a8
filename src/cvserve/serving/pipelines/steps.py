"""What each kind of declared step does (``config.graph``): a store model on whole images
or crops, the packaged PP-OCR operations, crops, filters, and the gallery.

A step that runs behind the broker is the same object in a ``cvserve worker``: its
``run_messages`` turns a batch of items from any requests into one result each, with the
answer as JSON in the ``answer`` header (``ocr_rec``: ``text`` and ``score``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cvserve.brokers import Message
from cvserve.config.checks import ConfigError
from cvserve.config.graph import Step
from cvserve.images.preprocess import ImageMeta
from cvserve.images.transforms import normalize_into, resize_crop
from cvserve.serving.pipelines.base import (
    BATCH,
    INFER_S,
    POST_S,
    StageOptions,
    open_stage_model,
    waited_for_cores,
)
from cvserve.tasks.encode import encode_result

#: Result header of a model step: its answer for the item, as JSON.
ANSWER = "answer"
#: Work headers: the size (width, height) of the image or crop the item's pixels came from.
WIDTH, HEIGHT = "w", "h"


def model_meta(step: Step, cache_dir: str | None):
    """The store entry of a model step (built if needed); one line naming the step if the
    model is unknown."""
    from cvserve.models import store

    try:
        return store.ensure_built(step.target, cache_dir)
    except (LookupError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"step {step.name!r}: model {step.target!r}: {e}") from None


class ModelStep:
    """A model of the store, on the whole image or on crops; its session opens on first
    use (a server whose step runs only in workers never opens it)."""

    def __init__(self, step: Step, options: StageOptions) -> None:
        from cvserve.models import store
        from cvserve.tasks.base import get_head
        from cvserve.tasks.params import ParamError, parse_params

        self.step = step
        self.options = options
        self.meta = model_meta(step, options.cache_dir)
        self.path = store.model_path(self.meta, options.cache_dir)
        self.spec = self.meta.preprocess
        self.head = get_head(self.meta)
        try:
            self.params = parse_params(self.head.params, step.params)
        except ParamError as e:
            raise ConfigError(f"step {step.name!r}: {e}") from None
        self._rt = None

    def open(self) -> ModelStep:
        """Open the model's session (once)."""
        if self._rt is None:
            self._rt = open_stage_model(self.path, self.options, self.step.dnns()[0])
        return self

    @property
    def size(self) -> tuple[int, int]:
        return (self.spec.width, self.spec.height)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        return np.asarray(resize_crop(image, image.size, self.spec))

    def run(self, pixels: list[np.ndarray], sizes: list[tuple[int, int]]) -> tuple[list, dict]:
        """Answers for prepared pixels (``prepare_image`` or a crop at ``size``) of images
        of ``sizes``, in one call; and the seconds per trace stage."""
        self.open()
        waited_for_cores(self.options)  # forget what a call that raised on this thread left
        t0 = time.perf_counter()
        x = np.empty((len(pixels), *self.spec.input_shape), self.spec.dtype)
        for i, p in enumerate(pixels):
            normalize_into(p, x[i], self.spec)
        t1 = time.perf_counter()
        outputs = self._rt.run(x)
        t2 = time.perf_counter()
        answers = [
            self.head.postprocess(
                [o[i] for o in outputs], ImageMeta(orig_size=tuple(sizes[i]), format="", reduced=1),
                **self.params,
            )
            for i in range(len(pixels))
        ]  # fmt: skip
        t3 = time.perf_counter()
        waited = waited_for_cores(self.options)
        return answers, {"normalize": t1 - t0, "queue": waited, "infer": t2 - t1 - waited,
                         "postprocess": t3 - t2}  # fmt: skip

    def run_messages(self, messages: list[Message]) -> list[Message]:
        pixels = [m.arrays["pixels"] for m in messages]
        sizes = [(int(m.headers.get(WIDTH, 1)), int(m.headers.get(HEIGHT, 1))) for m in messages]
        answers, st = self.run(pixels, sizes)
        n = len(messages)
        return [
            m.reply(
                headers={
                    ANSWER: encode_result(a)[0].decode(),
                    INFER_S: st["infer"],
                    POST_S: st["normalize"] + st["postprocess"],
                    BATCH: n,
                }
            )  # fmt: skip
            for m, a in zip(messages, answers, strict=True)
        ]


class OcrDetOp:
    """``op: ocr_det``: PP-OCRv4 text detection (the packaged model) -> text polygons."""

    def __init__(self, step: Step, options: StageOptions) -> None:
        from cvserve.serving.pipelines.ocr import OcrDetStage

        self.stage = OcrDetStage(options)

    def run_image(self, rgb: np.ndarray):
        from cvserve.tasks.ocr import detect

        st = self.stage
        waited_for_cores(st.options)
        found = detect(rgb, st.det, st.cfg.det)
        waited = waited_for_cores(st.options)
        stages = dict(found.stages)
        stages["infer"] = stages.get("infer", 0.0) - waited
        stages["queue"] = waited
        return found, stages


class OcrRecOp:
    """``op: ocr_rec``: the angle classifier and the recognizer on text crops."""

    def __init__(self, step: Step, options: StageOptions) -> None:
        from cvserve.serving.pipelines.ocr import OcrRecStage

        self.stage = OcrRecStage(options)

    def run_messages(self, messages: list[Message]) -> list[Message]:
        return self.stage.run(messages)


def make_step(step: Step, options: StageOptions):
    """The object that runs a model or op step."""
    if step.kind == "model":
        return ModelStep(step, options).open()
    if step.target == "ocr_det":
        return OcrDetOp(step, options)
    return OcrRecOp(step, options)


# --- crops and filters ------------------------------------------------------------------


@dataclass
class Crop:
    """One region of the image: where (``box``: x0, y0, x1, y1 as cut; ``polygon`` for
    text), what found it (``found``: the detection or the text score), and its pixels."""

    box: tuple[int, int, int, int]
    found: dict[str, Any]
    upright: np.ndarray | None = None  # a text region turned upright (polygons)

    def pixels(self, image: Image.Image, size: tuple[int, int] | None) -> np.ndarray:
        """The region at ``size`` (a model's input size), or as it is (None)."""
        if self.upright is not None:
            if size is None:
                return np.ascontiguousarray(self.upright)
            return np.asarray(Image.fromarray(self.upright).resize(size, Image.Resampling.BILINEAR))
        if size is None:
            return np.asarray(image.crop(self.box))
        return np.asarray(image.resize(size, Image.Resampling.BILINEAR, box=self.box))

    def describe(self) -> dict[str, Any]:
        return dict(self.found)


@dataclass
class Crops:
    items: list[Crop] = field(default_factory=list)


def filter_detections(step: Step, answer: dict) -> dict:
    """``filter``: the detections kept by label, score and top-k (in score order)."""
    found = answer.get("detections", [])
    if step.labels:
        found = [d for d in found if str(d.get("label")) in step.labels]
    if step.score_above is not None:
        found = [d for d in found if float(d.get("score", 0.0)) > step.score_above]
    if step.top_k is not None:
        found = sorted(found, key=lambda d: -float(d.get("score", 0.0)))[: step.top_k]
    return {"detections": found}


def crop_boxes(step: Step, answer: dict, size: tuple[int, int]) -> Crops:
    """``crop`` from detections: each box grown by ``margin`` (and to a square), clipped to
    the image, and dropped when smaller than ``min_size``."""
    w0, h0 = size
    out = Crops()
    for d in answer.get("detections", []):
        x0, y0, x1, y1 = (float(v) for v in d["box"])
        bw, bh = x1 - x0, y1 - y0
        if step.square:
            cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, max(bw, bh)
            x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
            bw = bh = side
        if step.margin:
            x0, y0 = x0 - step.margin * bw, y0 - step.margin * bh
            x1, y1 = x1 + step.margin * bw, y1 + step.margin * bh
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w0), x1), min(float(h0), y1)
        if step.min_size > 1 and (x1 - x0 < step.min_size or y1 - y0 < step.min_size):
            continue
        # Whole pixels that cover the box, at least one wide.
        box = (int(x0), int(y0), max(int(x0) + 1, math.ceil(x1)), max(int(y0) + 1, math.ceil(y1)))
        found = {"box": [round(float(v), 1) for v in d["box"]], "score": float(d["score"]),
                 "label": d.get("label"), "index": d.get("index")}  # fmt: skip
        if box != tuple(round(v) for v in d["box"]) and (step.margin or step.square):
            found["crop"] = list(box)
        out.items.append(Crop(box=box, found=found))
    return out


def crop_polygons(step: Step, detected, rgb: np.ndarray) -> Crops:
    """``crop`` from text polygons: each turned upright (``upright``), or its bounding
    rectangle in the image."""
    out = Crops()
    for i, (poly, score) in enumerate(
        zip(detected.boxes.boxes, detected.boxes.scores, strict=True)
    ):
        xs, ys = poly[:, 0], poly[:, 1]
        box = (max(0, int(xs.min())), max(0, int(ys.min())),
               max(int(xs.min()) + 1, math.ceil(xs.max())), max(int(ys.min()) + 1, math.ceil(ys.max())))  # fmt: skip
        if step.min_size > 1 and min(box[2] - box[0], box[3] - box[1]) < step.min_size:
            continue
        found = {"polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in poly],
                 "det_score": float(score), "region": i}  # fmt: skip
        out.items.append(Crop(box=box, found=found,
                              upright=detected.crops[i] if step.upright else None))  # fmt: skip
    return out


# --- the gallery ----------------------------------------------------------------------------


class Gallery:
    """``gallery``: named vectors from a file; each embedding's ``k`` nearest, by cosine
    distance (1 - cosine similarity) or Euclidean distance."""

    def __init__(self, step: Step) -> None:
        self.step = step
        path = Path(step.file)
        try:
            if path.suffix == ".json":
                table = json.loads(path.read_text())
                if not isinstance(table, dict):
                    raise ValueError("a JSON gallery is an object {name: [floats]}")
                names, vectors = list(table), [table[n] for n in table]
            else:
                with np.load(path, allow_pickle=False) as f:
                    names, vectors = [str(n) for n in f["names"]], f["vectors"]
            self.names = names
            self.vectors = np.asarray(vectors, dtype=np.float64)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"step {step.name!r}: gallery {step.file}: {e}") from None
        if self.vectors.ndim != 2 or len(self.names) != len(self.vectors) or not len(self.names):
            raise ConfigError(f"step {step.name!r}: gallery {step.file}: want N names and "
                              f"N vectors of one length, got {len(self.names)} names and an "
                              f"array of shape {self.vectors.shape}")  # fmt: skip
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        self.unit = self.vectors / np.where(norms == 0, 1.0, norms)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def nearest(self, answer: dict) -> dict:
        v = np.asarray(answer["embedding"], dtype=np.float64).reshape(-1)
        if v.size != self.dim:
            raise ValueError(f"embedding of {v.size} values, gallery vectors of {self.dim}")
        if self.step.metric == "cosine":
            n = np.linalg.norm(v)
            dist = 1.0 - self.unit @ (v / (n if n else 1.0))
        else:
            dist = np.linalg.norm(self.vectors - v, axis=1)
        k = min(self.step.k, len(self.names))
        idx = np.argsort(dist, kind="stable")[:k]
        return {"neighbours": [{"name": self.names[i], "distance": round(float(dist[i]), 6)}
                               for i in idx]}  # fmt: skip
