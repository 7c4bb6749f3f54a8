"""OCR stage A, text detection: the detector input from an RGB image, and DB
post-processing from the probability map to ordered four-point text boxes.

Each step follows RapidOCR 1.4.4 (PaddleOCR's PP-OCRv4 pipeline) so that results agree
with the reference; where cvserve deviates (degenerate sizes), the docstring says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import pyclipper

# PP-OCR models were trained on cv2.imread pixels: BGR channel order, (x/255 - 0.5)/0.5.
# The reference computes x * (1/255) in float32, then the mean/std in float64, then casts;
# one 256-entry table reproduces that bit for bit and normalizes in one gather.
_DET_LUT = (
    ((np.arange(256, dtype=np.float32) * (1 / 255.0)).astype(np.float64) - 0.5) / 0.5
).astype(np.float32)
_DET_LUT.setflags(write=False)


@dataclass(frozen=True)
class DetConfig:
    """Detection settings; the defaults are RapidOCR 1.4.4's ``config.yaml``."""

    # Size guards applied to the whole image before anything else (RapidOCR "Global").
    max_side_len: int = 2000
    min_side_len: int = 30
    # Very wide or very short images get black bands above and below (a letterbox).
    min_height: int = 30
    width_height_ratio: float = 8.0  # -1 disables the letterbox for wide images
    # Detector input: scale so the shorter side is >= limit_side_len ("min"), or the
    # longer side <= limit_side_len ("max"); each side is then rounded to a multiple of 32.
    limit_side_len: int = 736
    limit_type: Literal["min", "max"] = "min"
    # DB post-processing.
    thresh: float = 0.3  # probability -> text pixel
    box_thresh: float = 0.5  # mean probability inside a box to keep it
    max_candidates: int = 1000  # contours looked at, at most
    unclip_ratio: float = 1.6  # how far a shrunk text kernel is grown back
    use_dilation: bool = True  # 2x2 dilation of the binary map
    min_size: int = 3  # boxes with a shorter side than this (map pixels) are dropped


@dataclass(frozen=True)
class DetMeta:
    """What maps detector output back to the image. Sizes are (height, width)."""

    orig_size: tuple[int, int]  # the RGB image given to ``det_preprocess``
    work_size: tuple[int, int]  # after the size guards and letterbox: the crops' frame
    input_size: tuple[int, int]  # the detector input (multiples of 32)
    scale: tuple[float, float]  # (y, x) original pixels per work pixel
    pad_top: int  # letterbox rows added above the image in the work frame


@dataclass(frozen=True)
class DetInput:
    """One image prepared for the detector."""

    tensor: np.ndarray  # (3, H, W) float32, BGR, normalized; add a batch axis to run it
    image: np.ndarray  # the work image (H, W, 3) uint8 RGB that text regions are cut from
    meta: DetMeta


@dataclass(frozen=True)
class DetBoxes:
    """Detected text boxes in reading order: (N, 4, 2) float32 points, clockwise from
    top-left. ``work_boxes`` are in the work image (crop from it), ``boxes`` in the
    original image (report them)."""

    work_boxes: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray  # (N,) mean text probability inside each box

    def __len__(self) -> int:
        return len(self.boxes)


def _round32(x: int) -> int:
    # Python's round (half to even), as the reference; never below one 32-pixel block.
    return max(32, int(round(x / 32) * 32))


def _resize_ratio(img: np.ndarray, ratio: float) -> np.ndarray:
    h, w = img.shape[:2]
    rh, rw = _round32(int(h * ratio)), _round32(int(w * ratio))
    if (rh, rw) == (h, w):
        return img
    return cv2.resize(img, (rw, rh))


def det_input_size(height: int, width: int, cfg: DetConfig = DetConfig()) -> tuple[int, int]:
    """Detector input (height, width) for a work image of this size."""
    side = min(height, width) if cfg.limit_type == "min" else max(height, width)
    if cfg.limit_type == "min":
        ratio = cfg.limit_side_len / side if side < cfg.limit_side_len else 1.0
    else:
        ratio = cfg.limit_side_len / side if side > cfg.limit_side_len else 1.0
    return _round32(int(height * ratio)), _round32(int(width * ratio))


def det_preprocess(rgb: np.ndarray, cfg: DetConfig = DetConfig()) -> DetInput:
    """RGB (H, W, 3) uint8 -> detector input (3, H', W') and the meta to map boxes back.

    Steps, as RapidOCR: (1) a longer side over ``max_side_len`` is scaled down, a shorter
    side under ``min_side_len`` up (each side rounded to a multiple of 32); (2) images
    wider than ``width_height_ratio`` or not taller than ``min_height`` get black bands
    above and below; (3) the detector size rule (``det_input_size``), bilinear resize;
    (4) BGR, (x/255 - 0.5)/0.5, CHW. Deviations: when both guards of (1) fire, cvserve
    composes their scales (the reference keeps only the last), and no side is rounded
    below 32 (the reference fails there).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    oh, ow = rgb.shape[:2]
    img = rgb
    if max(oh, ow) > cfg.max_side_len:
        img = _resize_ratio(img, cfg.max_side_len / max(oh, ow))
    h, w = img.shape[:2]
    if min(h, w) < cfg.min_side_len:
        img = _resize_ratio(img, cfg.min_side_len / min(h, w))
    h, w = img.shape[:2]
    scale = (oh / h, ow / w)

    pad = 0
    wide = cfg.width_height_ratio != -1 and w / h > cfg.width_height_ratio
    if h <= cfg.min_height or wide:
        new_h = max(int(w / cfg.width_height_ratio), cfg.min_height) * 2
        pad = int(abs(new_h - h) / 2)
        img = cv2.copyMakeBorder(img, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    work = np.ascontiguousarray(img)
    wh, ww = work.shape[:2]

    ih, iw = det_input_size(wh, ww, cfg)
    resized = work if (ih, iw) == (wh, ww) else cv2.resize(work, (iw, ih))
    # BGR planes straight out of the table: reversed channels, CHW, normalized, one pass.
    tensor = _DET_LUT[resized.transpose(2, 0, 1)[::-1]]
    meta = DetMeta(
        orig_size=(oh, ow), work_size=(wh, ww), input_size=(ih, iw), scale=scale, pad_top=pad
    )
    return DetInput(tensor=tensor, image=work, meta=meta)


# --- DB post-processing -------------------------------------------------------------


def mini_box(points: np.ndarray) -> tuple[np.ndarray, float]:
    """The minimum-area rectangle around ``points`` as 4 float32 corners (top-left,
    top-right, bottom-right, bottom-left, by the reference's rule) and its shorter side."""
    rect = cv2.minAreaRect(np.asarray(points, dtype=np.float32).reshape(-1, 1, 2))
    pts = sorted(list(cv2.boxPoints(rect)), key=lambda p: p[0])
    i1, i4 = (0, 1) if pts[1][1] > pts[0][1] else (1, 0)
    i2, i3 = (2, 3) if pts[3][1] > pts[2][1] else (3, 2)
    return np.array([pts[i1], pts[i2], pts[i3], pts[i4]]), float(min(rect[1]))


def box_score(prob: np.ndarray, box: np.ndarray) -> float:
    """Mean of ``prob`` inside the polygon ``box`` (DB's "fast" score: the polygon is
    rasterized with integer vertices inside its bounding rectangle)."""
    h, w = prob.shape[:2]
    box = np.array(box).reshape(-1, 2)  # a copy, in the caller's dtype as the reference
    xmin = int(np.clip(np.floor(box[:, 0].min()), 0, w - 1))
    xmax = int(np.clip(np.ceil(box[:, 0].max()), 0, w - 1))
    ymin = int(np.clip(np.floor(box[:, 1].min()), 0, h - 1))
    ymax = int(np.clip(np.ceil(box[:, 1].max()), 0, h - 1))
    mask = np.zeros((ymax - ymin + 1, xmax - xmin + 1), dtype=np.uint8)
    box[:, 0] -= xmin
    box[:, 1] -= ymin
    cv2.fillPoly(mask, box.reshape(1, -1, 2).astype(np.int32), 1)
    return float(cv2.mean(prob[ymin : ymax + 1, xmin : xmax + 1], mask)[0])


def unclip(box: np.ndarray, ratio: float) -> np.ndarray:
    """Grow polygon ``box`` outward by area * ratio / perimeter (DB's unclip, rounded
    joins, pyclipper as the reference). Returns (M, 2) points; empty if it vanished."""
    pts = np.asarray(box, dtype=np.float64).reshape(-1, 2)
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    perimeter = float(np.linalg.norm(pts - np.roll(pts, -1, axis=0), axis=1).sum())
    if perimeter == 0:
        return np.zeros((0, 2))
    offset = pyclipper.PyclipperOffset()
    offset.AddPath(box, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    paths = offset.Execute(area * ratio / perimeter)
    # Several paths are all kept, as the reference (it reshapes them into one point set).
    return np.array([p for path in paths for p in path], dtype=np.float64).reshape(-1, 2)


def order_points_clockwise(pts: np.ndarray) -> np.ndarray:
    """Four points -> float32 [top-left, top-right, bottom-right, bottom-left]: the two
    leftmost by x are the left side, each side split by y (the reference's rule)."""
    pts = np.asarray(pts)
    xs = pts[np.argsort(pts[:, 0]), :]
    left, right = xs[:2], xs[2:]
    tl, bl = left[np.argsort(left[:, 1]), :]
    tr, br = right[np.argsort(right[:, 1]), :]
    return np.array([tl, tr, br, bl], dtype=np.float32)


def reading_order(boxes: np.ndarray, line_tolerance: float = 10.0) -> list[int]:
    """Indices of ``boxes`` (N, 4, 2) top to bottom, then left to right among boxes whose
    top-left corners are less than ``line_tolerance`` pixels apart vertically.

    The reference's rule exactly: sort by (y, x) of the first point, then bubble each box
    left past neighbours on the same line.
    """
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][0][1], boxes[i][0][0]))
    for i in range(len(order) - 1):
        for j in range(i, -1, -1):
            a, b = boxes[order[j]][0], boxes[order[j + 1]][0]
            if abs(b[1] - a[1]) < line_tolerance and b[0] < a[0]:
                order[j], order[j + 1] = order[j + 1], order[j]
            else:
                break
    return order


def db_boxes(
    prob: np.ndarray, dest_size: tuple[int, int], cfg: DetConfig = DetConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """Probability map (H, W) -> int32 boxes (N, 4, 2) scaled to ``dest_size`` (h, w) and
    their scores, in contour order: threshold, dilate, contours, min-area rectangles,
    score filter, unclip, size filter."""
    height, width = prob.shape
    dest_h, dest_w = dest_size
    bitmap = (prob > cfg.thresh).astype(np.uint8)
    if cfg.use_dilation:
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), dtype=np.uint8))
    contours, _ = cv2.findContours(bitmap * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    boxes, scores = [], []
    for contour in contours[: cfg.max_candidates]:
        points, short = mini_box(contour)
        if short < cfg.min_size:
            continue
        score = box_score(prob, points)
        if score < cfg.box_thresh:
            continue
        grown = unclip(points, cfg.unclip_ratio)
        if len(grown) == 0:
            continue
        box, short = mini_box(grown)
        if short < cfg.min_size + 2:
            continue
        box[:, 0] = np.clip(np.round(box[:, 0] / width * dest_w), 0, dest_w)
        box[:, 1] = np.clip(np.round(box[:, 1] / height * dest_h), 0, dest_h)
        boxes.append(box.astype(np.int32))
        scores.append(score)
    return np.array(boxes, dtype=np.int32).reshape(-1, 4, 2), np.array(scores, dtype=np.float64)


def to_original(work_boxes: np.ndarray, meta: DetMeta) -> np.ndarray:
    """Work-frame points -> original-image points: undo the letterbox and the size
    guards, clip to the image (float32)."""
    out = np.array(work_boxes, dtype=np.float32).reshape(-1, 4, 2)
    out[..., 1] -= meta.pad_top
    out[..., 0] *= meta.scale[1]
    out[..., 1] *= meta.scale[0]
    oh, ow = meta.orig_size
    out[..., 0] = np.clip(out[..., 0], 0, ow)
    out[..., 1] = np.clip(out[..., 1], 0, oh)
    return out


def db_postprocess(prob: np.ndarray, meta: DetMeta, cfg: DetConfig = DetConfig()) -> DetBoxes:
    """Detector output for one image -> text boxes in reading order.

    ``prob`` is that image's probability map, (H, W), (1, H, W) or (1, 1, H, W); a map
    larger than ``meta.input_size`` (a padded batch) is cut to it. Boxes are ordered
    clockwise, clipped to the work image, and those with a side of 3 pixels or less
    are dropped, as the reference.
    """
    prob = np.asarray(prob)
    prob = prob.reshape(prob.shape[-2:])[: meta.input_size[0], : meta.input_size[1]]
    raw, scores = db_boxes(prob, meta.work_size, cfg)
    wh, ww = meta.work_size
    kept, kept_scores = [], []
    for box, score in zip(raw, scores, strict=True):
        box = order_points_clockwise(box)
        # int() truncation, as the reference's clip_det_res.
        box[:, 0] = np.clip(box[:, 0], 0, ww - 1).astype(np.int32)
        box[:, 1] = np.clip(box[:, 1], 0, wh - 1).astype(np.int32)
        if int(np.linalg.norm(box[0] - box[1])) <= 3 or int(np.linalg.norm(box[0] - box[3])) <= 3:
            continue
        kept.append(box)
        kept_scores.append(score)
    work = np.array(kept, dtype=np.float32).reshape(-1, 4, 2)
    order = reading_order(work)
    work = work[order]
    return DetBoxes(
        work_boxes=work,
        boxes=to_original(work, meta),
        scores=np.array(kept_scores, dtype=np.float64)[order],
    )
