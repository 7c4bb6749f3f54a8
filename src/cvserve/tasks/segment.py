"""Semantic segmentation head: logits (C, h, w) to a class map at the original image size
(``mask=full``, the default) or at the logits' own resolution (``mask=model``).

``full`` equals HuggingFace ``post_process_semantic_segmentation(outputs,
target_sizes=[(H, W)])`` (SegFormer and friends) bit for bit: bilinear upsampling with
``align_corners=False`` exactly as torch's CPU kernel does it (source index ``scale * (i +
0.5) - 0.5`` in float32 with ``scale = in / out`` in float32, negative ones clamped to 0,
the upper neighbour clamped to the last row/column; each ``a * wa + b * wb`` one fma, as
torch's AVX2/AVX-512 build computes it), then argmax over the classes (first index wins
ties). Outputs with ``H + W <= 128`` are the exception: there torch takes a separable path
whose rounding differs, so near-ties may differ there.

The full upsampled tensor (C x H x W; 150 x 4000 x 3000 floats is 7 GB) is never built.
Bilinear interpolation is a convex combination of the four logit pixels around each output
pixel, so in every low-resolution cell a class ``k`` can only win where
``max_corners(logit_k) >= max_j min_corners(logit_j)``. One pass over the logits finds each
cell's candidates; a fused kernel (:mod:`cvserve.tasks._segment_kernels`, numba, no GIL)
then fills the runs of output pixels in single-candidate cells (the interior of regions)
with that class, evaluates only the candidates elsewhere, writes the uint8/uint16 map and
counts the pixels per class in the same pass.

Geometry: for ``direct`` resize the logits cover the whole image, as in HF. For
``shortest_edge_crop`` and ``letterbox`` specs every original pixel is first mapped into the
model-input frame (resized-image scale, minus the crop offset; letterbox padding is thus
skipped); original pixels that fall outside the crop (never seen by the model) get the
fill value ``ignore_index`` (default: 255 for uint8 maps, 65535 for uint16 maps) and are
not counted in ``classes``. With ``mask=model`` the map is the argmax of the logits
themselves, and the answer carries ``mask_frame``: the map's pixel edges are ``u = x *
scale + offset`` for the photo's pixel edges ``x``; cells of a letterbox's padding get the
fill value.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, resized_size
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param

log = logging.getLogger(__name__)

#: ``mask`` parameter: the photo's size (HF-equal) or the logits' own resolution.
MASK_RESOLUTIONS = ("full", "model")


def axis_map(n_out: int, n_in: int, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates ``(i + 0.5) * scale + offset - 0.5`` of ``n_out`` output pixels
    on an axis with ``n_in`` logit pixels, and a mask of those inside ``[0, n_in)``.

    ``scale`` is logit pixels per output pixel, ``offset`` the logit coordinate (pixel-edge
    convention) of the output's left edge. For a plain resize ``scale = n_in / n_out`` and
    ``offset = 0``, which is torch's ``align_corners=False`` rule.
    """
    edge = (np.arange(n_out, dtype=np.float64) + 0.5) * scale + offset
    inside = (edge >= 0) & (edge <= n_in)
    return edge - 0.5, inside


def model_frame(
    spec: PreprocessSpec, orig: tuple[int, int], out_hw: tuple[int, int]
) -> tuple[float, float, float, float]:
    """``(scale_x, offset_x, scale_y, offset_y)`` taking original-image pixel edges to the
    pixel edges of an output map of size ``out_hw`` (h, w) covering the model input."""
    w0, h0 = orig
    h, w = out_hw
    if spec.resize_mode == "direct":
        return w / w0, 0.0, h / h0, 0.0
    rw, rh = resized_size(w0, h0, spec)
    left, top, _, _ = crop_box(w0, h0, spec)
    fx = w / spec.width  # map pixels per model-input pixel
    fy = h / spec.height
    return rw / w0 * fx, -left * fx, rh / h0 * fy, -top * fy


def _taps(
    n_out: int, n_in: int, scale: float | None = None, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Bilinear neighbours ``i0``, ``i1`` (int64) and weight ``lam`` (float32) of ``n_out``
    output pixels, and the range ``[lo, hi)`` of those inside the frame.

    ``scale=None`` is a plain resize as torch computes it (float32 ``n_in / n_out``, the
    source index rounded to float32 once); otherwise the frame of :func:`axis_map`."""
    if scale is None:
        s32 = np.float64(np.float32(n_in) / np.float32(n_out))
        src = (s32 * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
        lo, hi = 0, n_out
    else:
        src64, inside = axis_map(n_out, n_in, scale, offset)
        src = src64.astype(np.float32)
        where = np.flatnonzero(inside)  # contiguous: the map is monotonic
        lo, hi = (int(where[0]), int(where[-1]) + 1) if where.size else (0, 0)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    return i0, i1, lam, lo, hi


def _runs(i0: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Boundaries of the runs of equal ``i0`` (non-decreasing) in ``[lo, hi)``: ``[lo, ...,
    hi]``; ``[lo]`` when the range is empty."""
    if hi <= lo:
        return np.array([lo], np.int64)
    cuts = np.flatnonzero(np.diff(i0[lo:hi])) + 1 + lo
    return np.concatenate(([lo], cuts, [hi])).astype(np.int64)


def map_dtype(classes: int, fill: int | None = None) -> np.dtype:
    """uint8 class maps up to 255 classes (255 stays free for the fill) and fill values up
    to 255, else uint16."""
    small = classes <= 255 and (fill is None or fill <= 255)
    return np.dtype(np.uint8 if small else np.uint16)


def upsample_argmax(
    logits: np.ndarray,
    out_hw: tuple[int, int],
    frame: tuple[float, float, float, float] | None = None,
    fill: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """argmax over classes of the bilinear upsampling of ``logits`` (C, h, w) to ``out_hw``.

    ``frame`` None is a plain resize (torch's, HF's); otherwise ``(scale_x, offset_x,
    scale_y, offset_y)`` of :func:`model_frame`, and pixels outside it get ``fill``
    (default: the map dtype's largest value). Returns the map (uint8, or uint16 past 255
    classes) and the number of pixels of each class (int64, C; fill pixels not counted).
    """
    import cvserve.tasks._segment_kernels as kern

    logits = np.ascontiguousarray(logits, dtype=np.float32)
    c, h, w = logits.shape
    H, W = out_hw
    dtype = map_dtype(c, fill)
    fill = int(np.iinfo(dtype).max) if fill is None else int(fill)
    if frame is None:
        x0, x1, lx, xa, xb = _taps(W, w)
        y0, y1, ly, ya, yb = _taps(H, h)
    else:
        sx, ox, sy, oy = frame
        x0, x1, lx, xa, xb = _taps(W, w, sx, ox)
        y0, y1, ly, ya, yb = _taps(H, h, sy, oy)
    start, cls = kern.candidates(logits)
    out = np.empty((H, W), dtype)
    counts = np.zeros(c, np.int64)
    kern.upsample_argmax(
        logits, start, cls, y0, y1, ly, x0, x1, lx,
        _runs(y0, ya, yb), _runs(x0, xa, xb), fill, out, counts,
    )  # fmt: skip
    return out, counts


def argmax_model(
    logits: np.ndarray,
    frame: tuple[float, float, float, float],
    image_size: tuple[int, int],
    fill: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The class map at the logits' own resolution (h, w): argmax over classes, with
    ``fill`` in the cells whose centres fall outside the photo (a letterbox's padding).
    Returns the map and the cells per class, as :func:`upsample_argmax`."""
    import cvserve.tasks._segment_kernels as kern

    logits = np.ascontiguousarray(logits, dtype=np.float32)
    c, h, w = logits.shape
    dtype = map_dtype(c, fill)
    fill = int(np.iinfo(dtype).max) if fill is None else int(fill)
    sx, ox, sy, oy = frame
    W0, H0 = image_size
    # cell centre j + 0.5 in map pixels -> (j + 0.5 - offset) / scale photo pixels
    u = np.arange(w) + 0.5
    v = np.arange(h) + 0.5
    inx = (u >= ox) & (u <= W0 * sx + ox)
    iny = (v >= oy) & (v <= H0 * sy + oy)
    out = np.empty((h, w), dtype)
    counts = np.zeros(c, np.int64)
    kern.argmax_classes(logits, np.ascontiguousarray(iny[:, None] & inx[None]), fill, out, counts)
    return out, counts


class SegmentHead:
    task = "segment"
    params = (
        Param("ignore_index", int, None, 0, 65535, help="class id outside the crop"),
        Param(
            "mask",
            str,
            "full",
            choices=MASK_RESOLUTIONS,
            help="full: the photo's size (HF-equal); model: the logits' own resolution",
        ),
    )
    #: a class map at the photo's size: real CPU, off the event loop
    heavy = True

    def __init__(self, model: ModelMeta) -> None:
        import cvserve.tasks._segment_kernels as kern

        self.labels = list(model.labels)
        self.spec = model.preprocess
        # Compile (or load from numba's disk cache) now, at model load, not on a request.
        seconds = kern.warm_up(map_dtype(len(self.labels) or 1))
        if seconds > 0.01:
            log.info("segmentation kernels ready in %.2f s", seconds)

    def postprocess(
        self,
        outputs: list[np.ndarray],
        meta: ImageMeta,
        ignore_index: int | None = None,
        mask: str = "full",
        **_: Any,
    ) -> dict:
        logits = np.asarray(outputs[0])
        if logits.ndim != 3:
            raise ValueError(f"segmentation logits must be (C, h, w), got {logits.shape}")
        c, h, w = logits.shape
        W, H = meta.orig_size
        frame = model_frame(self.spec, (W, H), (h, w))
        extra: dict[str, Any] = {"mask_resolution": mask}
        if mask == "model":
            cls, counts = argmax_model(logits, frame, (W, H), ignore_index)
            sx, ox, sy, oy = frame
            extra["image_size"] = [W, H]
            extra["mask_frame"] = {"scale": [sx, sy], "offset": [ox, oy]}
        else:
            direct = self.spec.resize_mode == "direct"
            cls, counts = upsample_argmax(logits, (H, W), None if direct else frame, ignore_index)
        total = max(int(counts.sum()), 1)
        present = np.nonzero(counts)[0]
        present = present[np.argsort(-counts[present], kind="stable")]
        fill = int(np.iinfo(cls.dtype).max) if ignore_index is None else int(ignore_index)
        return {
            "mask": cls,
            "classes": [
                {
                    "index": int(i),
                    "label": self._label(int(i)),
                    "fraction": float(counts[i] / total),
                }
                for i in present
            ],
            "ignore_index": fill,
            **extra,
        }

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"


HEAD = SegmentHead
