"""Object detection head: DETR-family query outputs to boxes in original-image pixels.

``outputs`` are ``logits`` (Q, C) and ``pred_boxes`` (Q, 4; normalized cx, cy, w, h of the
model input), as HuggingFace's DETR-style detectors return them. Scoring follows the
matching HF ``post_process_object_detection``:

* ``"sigmoid"`` (RT-DETR, D-FINE, Deformable DETR: focal-loss models, HF's
  ``use_focal_loss=True``): sigmoid of every logit, top ``Q`` of the flattened ``Q * C``
  scores (a query may appear with several labels), then ``score > threshold``.
* ``"softmax"`` (DETR, YOLOS, Conditional DETR, Table Transformer): softmax over the classes,
  the last ("no object") class dropped, best class per query, then ``score > threshold``.

The scoring comes from the ``score`` param, else ``model.extra["score"]``, else from
``model.extra["architecture"]`` (``SIGMOID_ARCHS`` are sigmoid, everything else softmax).

Boxes: HF scales normalized boxes by the target size, which is exact for ``direct``
resize. Here the boxes are taken to model-input pixels and mapped back through the
preprocessing geometry (crop offset / letterbox padding, then the per-axis resize scale),
so ``direct``, ``shortest_edge_crop`` and ``letterbox`` specs all come back in original
pixels (not clipped to the image, as HF doesn't clip either; ``clip=True`` clips).
Detections are sorted by score; ``top_k`` keeps the best ones; ``nms_iou`` (off by default,
DETR-style models need none) runs greedy NMS per label, or across labels with
``nms_class_agnostic=True``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, resized_size
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.base import softmax
from cvserve.tasks.params import Param

DEFAULT_THRESHOLD = 0.5
SIGMOID_ARCHS = frozenset(
    {
        "rt_detr",
        "rt_detr_v2",
        "d_fine",
        "deformable_detr",
        "deta",
        "grounding_dino",
        "mm_grounding_dino",
        "omdet-turbo",
        "RTDetrForObjectDetection",
        "RTDetrV2ForObjectDetection",
        "DFineForObjectDetection",
        "DeformableDetrForObjectDetection",
    }
)


def input_to_original(boxes: np.ndarray, spec: PreprocessSpec, orig: tuple[int, int]) -> np.ndarray:
    """Map xyxy boxes in model-input pixels to original-image pixels (float64 copy)."""
    w0, h0 = orig
    rw, rh = resized_size(w0, h0, spec)
    left, top, _, _ = crop_box(w0, h0, spec)
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    out[:, 0::2] = (out[:, 0::2] + left) * (w0 / rw)
    out[:, 1::2] = (out[:, 1::2] + top) * (h0 / rh)
    return out


def original_to_input(boxes: np.ndarray, spec: PreprocessSpec, orig: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`input_to_original`."""
    w0, h0 = orig
    rw, rh = resized_size(w0, h0, spec)
    left, top, _, _ = crop_box(w0, h0, spec)
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    out[:, 0::2] = out[:, 0::2] * (rw / w0) - left
    out[:, 1::2] = out[:, 1::2] * (rh / h0) - top
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS: indices kept, best score first; drops boxes with IoU > ``iou``."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
    area = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0, None)
        ih = np.clip(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0, None)
        inter = iw * ih
        union = area[i] + area[rest] - inter
        ov = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        order = rest[ov <= iou]
    return np.asarray(keep, dtype=np.int64)


class DetectHead:
    task = "detect"
    params = (
        Param(
            "threshold", float, DEFAULT_THRESHOLD, 0.0, 1.0, help="keep detections scoring above"
        ),
        Param("top_k", int, None, 1, 1000, help="keep at most this many detections"),
        Param("nms_iou", float, None, 0.0, 1.0, help="greedy NMS at this IoU (off unless given)"),
        Param("nms_class_agnostic", bool, False, help="NMS across classes"),
        Param("clip", bool, False, help="clip boxes to the image"),
        Param("score", str, None, choices=("sigmoid", "softmax"), help="default: by family"),
    )
    #: scoring every query and NMS take milliseconds: off the event loop
    heavy = True

    def __init__(self, model: ModelMeta) -> None:
        self.labels = list(model.labels)
        self.spec = model.preprocess
        extra = model.extra or {}
        score = extra.get("score")
        if score is None:
            # The model family: HF's model_type ("rt_detr"), recorded at build time.
            family = extra.get("model_type") or extra.get("architecture")
            score = "sigmoid" if family in SIGMOID_ARCHS else "softmax"
        self.score = score

    def postprocess(
        self,
        outputs: list[np.ndarray],
        meta: ImageMeta,
        threshold: float = DEFAULT_THRESHOLD,
        top_k: int | None = None,
        nms_iou: float | None = None,
        nms_class_agnostic: bool = False,
        score: str | None = None,
        clip: bool = False,
        **_: Any,
    ) -> dict:
        logits = np.asarray(outputs[0], dtype=np.float32)
        pred = np.asarray(outputs[1], dtype=np.float32)
        if logits.ndim != 2 or pred.shape != (logits.shape[0], 4):
            raise ValueError(
                f"want logits (Q, C) and boxes (Q, 4), got {logits.shape}, {pred.shape}"
            )
        q, c = logits.shape
        mode = score or self.score
        if mode == "sigmoid":
            probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            flat = probs.reshape(-1)
            # HF: topk(num_queries) of the flattened scores, sorted descending.
            idx = np.argsort(-flat, kind="stable")[:q]
            scores, labels, queries = flat[idx], idx % c, idx // c
        elif mode == "softmax":
            probs = softmax(logits.astype(np.float64), axis=1)[:, :-1]  # last: no object
            labels = probs.argmax(axis=1)
            scores = probs[np.arange(q), labels]
            queries = np.argsort(-scores, kind="stable")
            scores, labels = scores[queries], labels[queries]
        else:
            raise ValueError(f"score must be 'sigmoid' or 'softmax', got {mode!r}")

        keep = scores > threshold
        scores, labels, queries = scores[keep], labels[keep], queries[keep]

        cx, cy, bw, bh = (pred[queries, i].astype(np.float64) for i in range(4))
        norm = np.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], axis=1)
        spec = self.spec
        w0, h0 = meta.orig_size
        if spec.resize_mode == "direct":
            boxes = norm * np.array([w0, h0, w0, h0], dtype=np.float64)
        else:
            scale = np.array([spec.width, spec.height] * 2, dtype=np.float64)
            boxes = input_to_original(norm * scale, spec, (w0, h0))
        if clip:
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)

        if nms_iou is not None and scores.size:
            if nms_class_agnostic:
                kept = nms(boxes, scores, float(nms_iou))
            else:
                kept = np.concatenate(
                    [
                        np.nonzero(labels == lab)[0][
                            nms(boxes[labels == lab], scores[labels == lab], float(nms_iou))
                        ]
                        for lab in np.unique(labels)
                    ]
                )
                kept = kept[np.argsort(-scores[kept], kind="stable")]
            scores, labels, queries, boxes = scores[kept], labels[kept], queries[kept], boxes[kept]
        if top_k is not None:
            k = max(0, int(top_k))
            scores, labels, queries, boxes = scores[:k], labels[:k], queries[:k], boxes[:k]
        return {
            "detections": [
                {
                    "box": [float(v) for v in box],
                    "score": float(s),
                    "label": self._label(int(lab)),
                    "index": int(lab),
                    "query": int(qi),
                }
                for box, s, lab, qi in zip(boxes, scores, labels, queries, strict=True)
            ]
        }

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"


HEAD = DetectHead
