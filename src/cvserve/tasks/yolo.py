"""Ultralytics YOLO heads: detect, segment (instances) and pose, equal to Ultralytics'
own ``predict`` on the same ONNX export, in numpy (serving never imports ultralytics).

``outputs[0]`` is one image's ``(4 + classes + extra, anchors)``: centre-x, centre-y,
width, height in model-input pixels, the class scores (sigmoid already applied in the
graph), then 32 mask coefficients (segment) or ``K * 3`` keypoint values (pose).
Post-processing is Ultralytics' ``non_max_suppression`` (best class per anchor, ``score >
threshold``, the ``max_nms`` best, boxes offset by ``class * 7680`` so classes never
suppress each other, greedy NMS dropping IoU > ``nms_iou``, the ``top_k`` best kept),
then ``scale_boxes`` (minus the letterbox padding, over the per-axis gain, clipped to the
photo). Defaults are Ultralytics' predict defaults: conf 0.25, iou 0.7, max_det 300.

Segment: ``outputs[1]`` holds the prototypes ``(32, h/4, w/4)``. Each instance's mask is
Ultralytics' ``retina_masks`` mask at the photo's size (``process_mask_native``: the
coefficients times the prototypes, upsampled by 1, 2 or 4, the letterbox content cropped
and resized bilinearly to the photo, ``> 0``, zero outside the box). Only the pixels inside
the box are computed, each from 4 prototype pixels per axis (the two bilinear steps
composed): a few operations per pixel. ``mask=box`` (default)
answers each instance's mask over its box (``mask_origin``: the photo pixel of its top-left
corner), ``mask=full`` at the photo's size, ``mask=none`` without masks. Instances whose
mask is empty are dropped, as Ultralytics drops them.

Pose: each detection carries ``keypoints``: ``K`` rows of ``[x, y, visibility]`` in photo
pixels (``scale_coords``: clipped to the photo).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.images.transforms import crop_box, resized_size
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.detect import input_to_original, nms
from cvserve.tasks.params import Param

#: Ultralytics' predict defaults.
CONF = 0.25
IOU = 0.7
MAX_DET = 300
MAX_NMS = 30000
MAX_WH = 7680  # class offset: boxes of different classes never overlap

PARAMS = (
    Param("threshold", float, CONF, 0.0, 1.0, help="keep detections scoring above (conf)"),
    Param("nms_iou", float, IOU, 0.0, 1.0, help="NMS drops boxes overlapping more (iou)"),
    Param("top_k", int, MAX_DET, 1, 1000, help="keep at most this many (max_det)"),
    Param("nms_class_agnostic", bool, False, help="NMS across classes (agnostic_nms)"),
)


def select(
    pred: np.ndarray,
    classes: int,
    threshold: float = CONF,
    nms_iou: float = IOU,
    top_k: int = MAX_DET,
    agnostic: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ultralytics' NMS on one image's ``(4 + classes + extra, anchors)`` output:
    ``(boxes xyxy in input pixels, scores, labels, extra rows, anchor indices)``, best
    first."""
    pred = np.asarray(pred, dtype=np.float32)
    if pred.ndim != 2 or pred.shape[0] < 4 + classes:
        raise ValueError(f"want a (4 + {classes} + extra, anchors) output, got {pred.shape}")
    cls = pred[4 : 4 + classes]
    labels = cls.argmax(axis=0)
    scores = cls[labels, np.arange(pred.shape[1])]
    anchors = np.flatnonzero(scores > threshold)
    scores, labels = scores[anchors], labels[anchors]
    if anchors.size > MAX_NMS:
        best = np.argsort(-scores, kind="stable")[:MAX_NMS]
        anchors, scores, labels = anchors[best], scores[best], labels[best]
    cx, cy, w, h = (pred[i, anchors] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    offset = 0.0 if agnostic else labels.astype(np.float32)[:, None] * MAX_WH
    keep = nms(boxes + offset, scores, float(nms_iou))[: int(top_k)]
    extra = pred[4 + classes :, anchors[keep]].T
    return boxes[keep], scores[keep], labels[keep], extra, anchors[keep]


class YoloDetectHead:
    """Boxes, scores and labels of an Ultralytics detector (the ``detect`` answer)."""

    task = "yolo_detect"
    params = PARAMS
    #: NMS over thousands of candidates: off the event loop
    heavy = True

    def __init__(self, model: ModelMeta) -> None:
        self.labels = list(model.labels)
        self.spec = model.preprocess
        self.extra_rows = 0

    def _select(self, outputs: list[np.ndarray], p: dict[str, Any]) -> tuple[np.ndarray, ...]:
        out = np.asarray(outputs[0])
        classes = len(self.labels) or out.shape[0] - 4 - self.extra_rows
        return select(
            out,
            classes,
            threshold=p.get("threshold", CONF),
            nms_iou=p.get("nms_iou", IOU),
            top_k=p.get("top_k", MAX_DET),
            agnostic=p.get("nms_class_agnostic", False),
        )

    def _to_photo(self, boxes: np.ndarray, meta: ImageMeta) -> np.ndarray:
        w0, h0 = meta.orig_size
        out = input_to_original(boxes, self.spec, (w0, h0))
        out[:, 0::2] = out[:, 0::2].clip(0, w0)
        out[:, 1::2] = out[:, 1::2].clip(0, h0)
        return out

    def _detection(self, box: np.ndarray, score: float, label: int, anchor: int) -> dict:
        return {
            "box": [float(v) for v in box],
            "score": float(score),
            "label": self.labels[label] if label < len(self.labels) else f"class_{label}",
            "index": int(label),
            "anchor": int(anchor),
        }

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **p: Any) -> dict:
        boxes, scores, labels, _, anchors = self._select(outputs, p)
        photo = self._to_photo(boxes, meta)
        return {
            "detections": [
                self._detection(b, s, int(lab), int(a))
                for b, s, lab, a in zip(photo, scores, labels, anchors, strict=True)
            ]
        }


def _taps(
    n_in: int, scale: float, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear resize (``align_corners=False``, no antialiasing) at output pixels
    ``idx``: the two input neighbours and their weights; ``scale`` is input pixels per
    output pixel."""
    src = np.maximum((idx + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, 1.0 - lam, lam


def _axis_taps(
    n0: int, lo: int, hi: int, proto: int, f: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Photo pixels ``[lo, hi)`` on one axis as 4 prototype pixels and weights each (indices
    and weights, ``(hi - lo, 4)``): the prototypes upsampled by ``f``, the letterbox content
    ``[start, stop)`` kept and resized to ``n0`` pixels, two bilinear steps composed."""
    a0, a1, wa0, wa1 = _taps(stop - start, (stop - start) / n0, np.arange(lo, hi))
    b00, b01, w00, w01 = _taps(proto, 1.0 / f, start + a0)
    b10, b11, w10, w11 = _taps(proto, 1.0 / f, start + a1)
    idx = np.stack([b00, b01, b10, b11], axis=1)
    w = np.stack([wa0 * w00, wa0 * w01, wa1 * w10, wa1 * w11], axis=1).astype(np.float32)
    return idx, w


def instance_masks(
    protos: np.ndarray, coeffs: np.ndarray, boxes: np.ndarray, orig: tuple[int, int]
) -> list[tuple[np.ndarray, int, int]]:
    """Ultralytics' ``process_mask_native`` for each instance, only over its box: a list of
    ``(uint8 0/1 mask, x0, y0)`` where the mask covers photo pixels from ``(x0, y0)``."""
    w0, h0 = orig
    c, mh, mw = protos.shape
    ih, iw = 4 * mh, 4 * mw  # the model input
    gain = min(ih / h0, iw / w0)
    pad = (ih - max(round(h0 * gain), 1)) | (iw - max(round(w0 * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    uh, uw = mh * f, mw * f
    g = min(uh / h0, uw / w0)
    top = round((uh - max(round(h0 * g), 1)) / 2 - 0.1)
    left = round((uw - max(round(w0 * g), 1)) / 2 - 0.1)
    bottom, right = top + max(round(h0 * g), 1), left + max(round(w0 * g), 1)
    flat = np.asarray(protos, np.float32).reshape(c, -1)
    taps = (0, 2) if f == 1 else (0, 1, 2, 3)  # f == 1: the upsampling is the identity
    out = []
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        # crop_mask keeps columns r with x1 <= r < x2
        cx0, cx1 = max(0, math.ceil(x1)), min(w0, math.ceil(x2))
        cy0, cy1 = max(0, math.ceil(y1)), min(h0, math.ceil(y2))
        if cx1 <= cx0 or cy1 <= cy0:
            out.append((np.zeros((0, 0), np.uint8), cx0, cy0))
            continue
        m = (np.asarray(coeffs[k], np.float32) @ flat).reshape(mh, mw)
        iy, wy = _axis_taps(h0, cy0, cy1, mh, f, top, bottom)
        ix, wx = _axis_taps(w0, cx0, cx1, mw, f, left, right)
        rows = sum(wy[:, j, None] * m[iy[:, j]] for j in taps)  # (box h, mw)
        logit = rows[:, ix[:, 0]] * wx[:, 0]
        for j in taps[1:]:
            logit += rows[:, ix[:, j]] * wx[:, j]
        out.append(((logit > 0).view(np.uint8), cx0, cy0))
    return out


class YoloSegmentHead(YoloDetectHead):
    """Instance masks at the photo's size plus boxes, as Ultralytics' ``retina_masks``."""

    task = "yolo_segment"
    params = (
        *PARAMS,
        Param("mask", str, "box", choices=("box", "full", "none"), help="each mask's extent"),
    )

    def __init__(self, model: ModelMeta) -> None:
        super().__init__(model)
        self.extra_rows = 32

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **p: Any) -> dict:
        if len(outputs) < 2:
            raise ValueError("a YOLO segmenter has two outputs: detections and prototypes")
        protos = np.asarray(outputs[1])
        boxes, scores, labels, coeffs, anchors = self._select(outputs, p)
        photo = self._to_photo(boxes, meta)
        mode = p.get("mask", "box")
        w0, h0 = meta.orig_size
        dets = []
        for (mask, x0, y0), b, s, lab, a in zip(
            instance_masks(protos, coeffs, photo, (w0, h0)), photo, scores, labels, anchors,
            strict=True,
        ):  # fmt: skip
            if not mask.any():
                continue  # Ultralytics keeps only predictions with masks
            d = self._detection(b, s, int(lab), int(a))
            if mode == "box":
                d["mask"], d["mask_origin"] = mask, [x0, y0]
            elif mode == "full":
                full = np.zeros((h0, w0), np.uint8)
                full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
                d["mask"] = full
            dets.append(d)
        return {"detections": dets}


class YoloPoseHead(YoloDetectHead):
    """Person boxes with keypoints ``[x, y, visibility]`` in photo pixels."""

    task = "yolo_pose"

    def __init__(self, model: ModelMeta) -> None:
        super().__init__(model)
        k, d = (model.extra or {}).get("kpt_shape", (17, 3))
        self.kpt_shape = (int(k), int(d))
        self.extra_rows = self.kpt_shape[0] * self.kpt_shape[1]

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **p: Any) -> dict:
        boxes, scores, labels, extra, anchors = self._select(outputs, p)
        photo = self._to_photo(boxes, meta)
        k, d = self.kpt_shape
        kpts = extra.reshape(-1, k, d).astype(np.float64)
        w0, h0 = meta.orig_size
        rw, rh = resized_size(w0, h0, self.spec)
        left, top, _, _ = crop_box(w0, h0, self.spec)
        kpts[..., 0] = ((kpts[..., 0] + left) * (w0 / rw)).clip(0, w0)
        kpts[..., 1] = ((kpts[..., 1] + top) * (h0 / rh)).clip(0, h0)
        dets = []
        for b, s, lab, a, kp in zip(photo, scores, labels, anchors, kpts, strict=True):
            det = self._detection(b, s, int(lab), int(a))
            det["keypoints"] = [[float(v) for v in row] for row in kp]
            dets.append(det)
        return {"detections": dets}
