"""Resize + crop + normalize as matrix products, for the GPU path of
:mod:`cvserve.images.gpu`: Pillow's own separable filter weights (``ImagingResample``'s,
support widened by the downscale factor, so it antialiases as the CPU path does) applied as
two matrix products, with the CPU path's geometry. The same code runs on NumPy (tested
against Pillow) and on CuPy (the device)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, resized_size

__all__ = ["DeviceGeometry", "device_geometry", "resize_normalize", "resize_weights"]


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -0.5) & (x < 0.5), 1.0, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(x == 0, 1.0, np.sin(np.pi * x) / (np.pi * x))
    return np.where(x >= 1.0, 0.0, s * (0.46 + 0.54 * np.cos(np.pi * x)))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0, 1.0, np.sin(np.pi * x) / (np.pi * x))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x > -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


#: Pillow's filters and their support (Resample.c).
_FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
    "box": (_box, 0.5),
    "hamming": (_hamming, 1.0),
    "lanczos": (_lanczos, 3.0),
}


def resize_weights(
    in_size: int, out_size: int, lo: float, hi: float, interpolation: str
) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights resampling ``[lo, hi)`` of a line of
    ``in_size`` pixels to ``out_size`` pixels, as Pillow's ``precompute_coeffs`` does."""
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation {interpolation!r} has no device resize")
    fn, support = _FILTERS[interpolation]
    scale = (hi - lo) / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = lo + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        if xmax <= xmin:
            continue
        k = fn((np.arange(xmin, xmax) - center + 0.5) / filterscale)
        total = k.sum()
        w[xx, xmin:xmax] = k / total if total != 0 else k
    return w.astype(np.float32)


@dataclass(frozen=True)
class DeviceGeometry:
    """Weights that take an upright decoded image of ``size`` to the model input."""

    size: tuple[int, int]
    wy: np.ndarray  # (height, H)
    wx: np.ndarray  # (width, W)


def device_geometry(orig: tuple[int, int], spec: PreprocessSpec) -> DeviceGeometry | None:
    """The resize + crop of the CPU path (HF geometry, :mod:`cvserve.images.transforms`)
    as two weight matrices, or None where the device does not do it (a crop reaching past
    the resized image, which pads; letterbox; nearest)."""
    if spec.resize_mode in ("letterbox", "letterbox_center") or spec.interpolation not in _FILTERS:
        return None
    w, h = orig
    rw, rh = resized_size(w, h, spec)
    left, top, right, bottom = crop_box(w, h, spec)
    if left < 0 or top < 0 or right > rw or bottom > rh:
        return None
    sx, sy = w / rw, h / rh
    wx = resize_weights(w, spec.width, left * sx, right * sx, spec.interpolation)
    wy = resize_weights(h, spec.height, top * sy, bottom * sy, spec.interpolation)
    return DeviceGeometry(orig, wy, wx)


def resize_normalize(xp: Any, image: Any, geom: DeviceGeometry, spec: PreprocessSpec, out: Any):
    """Resize + crop ``image`` (``H x W x 3`` uint8 RGB, on ``xp``'s device) with ``geom``
    and write the normalized model input into ``out`` (``spec.input_shape``, ``spec.dtype``).

    ``xp`` is ``numpy`` or ``cupy``: the same code runs on both. Pixels are rounded to
    uint8 after resizing, as the CPU path's Pillow image is, before normalizing.
    """
    h, w, c = image.shape
    wy = xp.asarray(geom.wy)
    wx = xp.asarray(geom.wx)
    x = image.astype(xp.float32).reshape(h, w * c)
    t = (wy @ x).reshape(geom.wy.shape[0], w, c)  # rows first: the larger reduction
    y = xp.matmul(wx, t)  # (height, width, 3): broadcast over output rows
    y = xp.clip(xp.rint(y), 0.0, 255.0)
    if spec.channel_order == "BGR":
        y = y[..., ::-1]
    if spec.layout == "NCHW":
        y = y.transpose(2, 0, 1)
        bshape: tuple[int, ...] = (3, 1, 1)
    else:
        bshape = (1, 1, 3)
    if spec.dtype == "uint8":
        out[...] = y.astype(xp.uint8)
        return
    std = np.asarray(spec.std, dtype=np.float64)
    scale = (spec.rescale / std).astype(np.float32).reshape(bshape)
    shift = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32).reshape(bshape)
    out[...] = y * xp.asarray(scale) + xp.asarray(shift)
