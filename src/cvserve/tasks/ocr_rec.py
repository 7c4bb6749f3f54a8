"""OCR stage B, text recognition: cut each detected region out (the fan-out), turn
upside-down lines upright (angle classifier), batch crops of similar width, and decode
the recognizer's CTC output with its dictionary.

Each step follows RapidOCR 1.4.4 (PaddleOCR's PP-OCRv4 pipeline) so that results agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

# Recognizer and classifier inputs: BGR, x/255 in float32, then (x - 0.5)/0.5, as the
# reference computes them (a different rounding order than the detector's).
_REC_LUT = ((np.arange(256, dtype=np.float32) / 255 - np.float32(0.5)) / np.float32(0.5)).astype(
    np.float32
)
_REC_LUT.setflags(write=False)

CTC_BLANK = "blank"  # class 0 of a PP-OCR recognizer


@dataclass(frozen=True)
class RecConfig:
    """Recognition settings; the defaults are RapidOCR 1.4.4's ``config.yaml``."""

    height: int = 48  # PP-OCRv4 rec input height
    min_width: int = 320  # a batch is never narrower than this
    batch_size: int = 6  # crops per recognizer call in ``recognize``
    use_cls: bool = True  # RapidOCR's default runs the angle classifier
    cls_height: int = 48
    cls_width: int = 192
    cls_batch_size: int = 6
    cls_thresh: float = 0.9  # rotate a crop 180 degrees above this "180" probability
    text_score: float = 0.5  # lines with a lower recognition score are dropped


def _to_bgr_chw(img: np.ndarray) -> np.ndarray:
    return _REC_LUT[img.transpose(2, 0, 1)[::-1]]


# --- fan-out: one image -> N crops -----------------------------------------------------


def crop_text_region(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Cut the quadrilateral ``box`` (4, 2; clockwise from top-left) out of ``image`` with
    a perspective warp (bicubic, edges replicated); a crop at least 1.5 times taller
    than wide is turned 90 degrees counter-clockwise, as vertical text usually is."""
    pts = np.asarray(box, dtype=np.float32).reshape(4, 2)
    width = max(1, int(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3]))))
    height = max(1, int(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2]))))
    dst = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float32)
    m = cv2.getPerspectiveTransform(pts, dst)
    crop = cv2.warpPerspective(
        image, m, (width, height), borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC
    )
    if crop.shape[0] / crop.shape[1] >= 1.5:
        crop = np.ascontiguousarray(np.rot90(crop))
    return crop


def crop_text_regions(image: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """One crop (h, w, 3) uint8 per box, in the boxes' order."""
    return [crop_text_region(image, box) for box in boxes]


# --- batching ---------------------------------------------------------------------------


def aspect_ratios(crops: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([c.shape[1] / float(c.shape[0]) for c in crops], dtype=np.float64)


def plan_batches(crops: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
    """Indices of ``crops`` grouped into batches of at most ``batch_size``, sorted by
    aspect ratio so that each batch pads little (the reference's grouping)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    order = np.argsort(aspect_ratios(crops))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def rec_width(crops: Sequence[np.ndarray], cfg: RecConfig = RecConfig()) -> int:
    """Width of the recognizer input for a batch of these crops: the widest aspect
    ratio at ``cfg.height``, never below ``cfg.min_width``."""
    widest = max([cfg.min_width / cfg.height, *aspect_ratios(crops).tolist()])
    return int(cfg.height * widest)


def padding_fraction(crops: Sequence[np.ndarray], cfg: RecConfig = RecConfig()) -> float:
    """Share of a batch's input columns that are padding (0 = none wasted)."""
    width = rec_width(crops, cfg)
    used = sum(min(width, math.ceil(cfg.height * r)) for r in aspect_ratios(crops))
    return 1.0 - used / (width * len(crops))


# --- angle classifier -----------------------------------------------------------------


def cls_preprocess(crops: Sequence[np.ndarray], cfg: RecConfig = RecConfig()) -> np.ndarray:
    """Crops -> classifier input (N, 3, cls_height, cls_width) float32: each crop scaled
    to the height, its width by aspect ratio up to cls_width, zero padded on the right."""
    out = np.zeros((len(crops), 3, cfg.cls_height, cfg.cls_width), dtype=np.float32)
    for i, crop in enumerate(crops):
        h, w = crop.shape[:2]
        rw = min(cfg.cls_width, math.ceil(cfg.cls_height * (w / float(h))))
        out[i, :, :, :rw] = _to_bgr_chw(cv2.resize(crop, (rw, cfg.cls_height)))
    return out


def cls_postprocess(
    probs: np.ndarray, crops: Sequence[np.ndarray], cfg: RecConfig = RecConfig()
) -> tuple[list[np.ndarray], list[tuple[int, float]]]:
    """Classifier output (N, 2) over angles [0, 180] -> the crops, those judged upside
    down (probability above ``cls_thresh``) turned 180 degrees, and (angle, probability)
    per crop. The input list is not changed."""
    probs = np.asarray(probs)
    if probs.shape != (len(crops), 2):
        raise ValueError(f"classifier output {probs.shape}, expected ({len(crops)}, 2)")
    idx = probs.argmax(axis=1)
    out, angles = [], []
    for i, crop in enumerate(crops):
        score = float(probs[i, idx[i]])
        flip = idx[i] == 1 and score > cfg.cls_thresh
        out.append(cv2.rotate(crop, cv2.ROTATE_180) if flip else crop)
        angles.append((180 if idx[i] == 1 else 0, score))
    return out, angles


# --- recognizer -----------------------------------------------------------------------


def rec_preprocess(
    crops: Sequence[np.ndarray], cfg: RecConfig = RecConfig(), width: int | None = None
) -> np.ndarray:
    """A batch of crops -> recognizer input (B, 3, height, W) float32, W = ``width`` or
    ``rec_width(crops)``: each crop scaled to the height, its width by aspect ratio (at
    most W), BGR, (x/255 - 0.5)/0.5, zero padded on the right."""
    if not crops:
        raise ValueError("no crops to batch")
    width = rec_width(crops, cfg) if width is None else width
    out = np.zeros((len(crops), 3, cfg.height, width), dtype=np.float32)
    for i, crop in enumerate(crops):
        h, w = crop.shape[:2]
        rw = min(width, math.ceil(cfg.height * (w / float(h))))
        out[i, :, :, :rw] = _to_bgr_chw(cv2.resize(crop, (rw, cfg.height)))
    return out


def ctc_labels(characters: Sequence[str]) -> list[str]:
    """A PP-OCR dictionary -> the recognizer's classes: blank first, space last."""
    return [CTC_BLANK, *characters, " "]


def ctc_decode(probs: np.ndarray, labels: Sequence[str]) -> list[tuple[str, float]]:
    """Greedy CTC decoding of recognizer output (B, T, C) (per-step class probabilities):
    the best class per step, repeats collapsed, blanks (class 0) removed. The score is
    the mean probability of the kept steps (0.0 for an empty text)."""
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[2] != len(labels):
        raise ValueError(f"recognizer output {probs.shape}, expected (B, T, {len(labels)})")
    idx = probs.argmax(axis=2)
    conf = probs.max(axis=2)
    keep = np.ones(idx.shape, dtype=bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    keep &= idx != 0
    results = []
    for row_idx, row_conf, row_keep in zip(idx, conf, keep, strict=True):
        text = "".join(labels[i] for i in row_idx[row_keep])
        kept = row_conf[row_keep]
        score = float(np.mean(kept, dtype=np.float64)) if kept.size else 0.0
        results.append((text, score))
    return results
