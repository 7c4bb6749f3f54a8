"""Depth estimation head: predicted depth (h, w) to a depth map at the original size.

Matches HuggingFace ``post_process_depth_estimation(outputs, target_sizes=[(H, W)])`` of
the DPT image processor (also used by Depth Anything and ZoeDepth-style DPT models):
``F.interpolate(mode="bicubic", align_corners=False)``, i.e. Keys cubic convolution with
``a = -0.75``, source coordinate ``(i + 0.5) * in / out - 0.5`` (not clamped) and the
four taps' indices clamped to the edge. Done separably as two small dense matrix products
in float64 (``Ry @ D @ Rx.T``), then cast to float32.

Geometry as in :mod:`cvserve.tasks.segment`: for ``direct`` resize this is exactly HF's
resize to the target size; for ``shortest_edge_crop`` / ``letterbox`` every original pixel
is mapped into the model-input frame (letterbox padding skipped); pixels outside a crop get
the nearest edge values (the taps clamp), so the map has no holes.

Result: ``{"depth": float32 (H, W), "min": float, "max": float}`` (the model's own units:
relative inverse depth for Depth Anything / DPT, metres for metric models).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.segment import model_frame

CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys weights of the taps at offsets -1, 0, 1, 2 for fractional positions ``t``."""
    a = CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_out: int, n_in: int, scale: float, offset: float = 0.0) -> np.ndarray:
    """(n_out, n_in) matrix of torch's bicubic (align_corners=False) interpolation along one
    axis, for output pixel edges ``(i + 0.5) * scale + offset`` in input pixels."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale + offset - 0.5
    i = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i)
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.repeat(np.arange(n_out), 4)
    cols = np.clip(i[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1).reshape(-1)
    np.add.at(m, (rows, cols), w.reshape(-1))
    return m


def resize_bicubic(
    depth: np.ndarray,
    out_hw: tuple[int, int],
    frame: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """torch-compatible bicubic resize of a 2-D map to ``out_hw`` (float32 result)."""
    d = np.asarray(depth, dtype=np.float64)
    h, w = d.shape
    H, W = out_hw
    if frame is None:
        frame = (w / W, 0.0, h / H, 0.0)
    sx, ox, sy, oy = frame
    ry = bicubic_matrix(H, h, sy, oy)
    rx = bicubic_matrix(W, w, sx, ox)
    return (ry @ d @ rx.T).astype(np.float32)


class DepthHead:
    task = "depth"
    params = ()
    #: a depth map at the photo's size: real CPU, off the event loop
    heavy = True

    def __init__(self, model: ModelMeta) -> None:
        self.spec = model.preprocess

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **_: Any) -> dict:
        pred = np.asarray(outputs[0])
        if pred.ndim == 3 and pred.shape[0] == 1:  # (1, h, w) channel axis
            pred = pred[0]
        if pred.ndim != 2:
            raise ValueError(f"predicted depth must be (h, w), got {pred.shape}")
        W, H = meta.orig_size
        frame = model_frame(self.spec, (W, H), pred.shape)
        depth = resize_bicubic(pred, (H, W), frame)
        return {"depth": depth, "min": float(depth.min()), "max": float(depth.max())}


HEAD = DepthHead
