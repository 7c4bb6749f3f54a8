"""The numpy segmentation head that ``cvserve.tasks.segment``'s numba kernel replaced
(commit 97fe3b2), kept verbatim so that ``benchmarks/heads.py`` measures old against new in
one run. Not used by cvserve.

It prunes candidate classes per low-resolution cell like the new head, with numpy
temporaries over all C x h x w logits (a stable argsort among them) and gathers per
ambiguous pixel; its source index is computed in float64 and its sums are not fused, so it
differs from torch on a few near-tie pixels where the new head is bit-exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, resized_size
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param

#: Ambiguous cells with at most this many candidate classes are evaluated with a fixed-size
#: candidate list; busier cells fall back to a bigger one.
SMALL_K = 4
#: Pixels evaluated per vectorized chunk (bounds temporary memory to ~ chunk * K * 40 B).
CHUNK = 1 << 18
#: Relative cost of one candidate evaluation vs one element of the dense path (measured:
#: a gathered 4-tap candidate costs about 3 dense elements).
DENSE_COST = 3
#: Bytes of float32 (C, rows, W) temporaries per row block of the dense path.
BLOCK_BYTES = 32 << 20


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


def _bilinear_taps(src: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) neighbours and weight, in float32 like torch."""
    s = np.maximum(src.astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(s).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (s - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, lam


def upsample_argmax(
    logits: np.ndarray,
    out_hw: tuple[int, int],
    frame: tuple[float, float, float, float] | None = None,
    fill: int = -1,
) -> np.ndarray:
    """argmax over classes of the bilinear upsampling of ``logits`` (C, h, w) to ``out_hw``.

    Returns int64 (H, W); pixels outside the logits' frame get ``fill``.
    """
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    c, h, w = logits.shape
    H, W = out_hw
    if frame is None:
        frame = (w / W, 0.0, h / H, 0.0)
    sx, ox, sy, oy = frame
    srcx, inx = axis_map(W, w, sx, ox)
    srcy, iny = axis_map(H, h, sy, oy)
    x0, x1, lx = _bilinear_taps(srcx, w)
    y0, y1, ly = _bilinear_taps(srcy, h)

    # Per cell (y0, x0): its corners are rows {y0, min(y0+1, h-1)} x cols {x0, ...}.
    yn = np.minimum(np.arange(h) + 1, h - 1)
    xn = np.minimum(np.arange(w) + 1, w - 1)
    a, b = logits, logits[:, yn]
    cc, d = logits[:, :, xn], b[:, :, xn]
    hi = np.maximum(np.maximum(a, b), np.maximum(cc, d))
    lo = np.minimum(np.minimum(a, b), np.minimum(cc, d))
    best_lo = lo.max(axis=0)
    # A small slack keeps float rounding of the interpolation from dropping a winner.
    slack = 1e-5 * (np.abs(best_lo) + 1.0)
    cand = hi >= (best_lo - slack)[None]
    count = cand.sum(axis=0)
    cell_class = lo.argmax(axis=0)  # the only candidate where count == 1

    out = cell_class[y0[:, None], x0[None, :]].astype(np.int64)
    amb_cell = count > 1
    if amb_cell.any():
        amb = amb_cell[y0[:, None], x0[None, :]]
        if not (inx.all() and iny.all()):
            amb &= iny[:, None] & inx[None, :]
        ys, xs = np.nonzero(amb)
        cnt = count[y0[ys], x0[xs]]
        big = cnt > SMALL_K
        work = SMALL_K * int((~big).sum()) + (int(count.max()) * int(big.sum()) if big.any() else 0)
        if work * DENSE_COST > c * H * W:
            # Candidates don't prune much (noisy logits): plain row-blocked upsampling.
            out = _dense_argmax(logits, y0, y1, ly, x0, x1, lx)
        elif ys.size:
            flat = logits.reshape(c, -1)
            order_all = np.argsort(~cand, axis=0, kind="stable")  # candidates first, ascending
            for sel, k in ((cnt <= SMALL_K, SMALL_K), (cnt > SMALL_K, int(count.max()))):
                if not sel.any():
                    continue
                k = min(k, c)
                order = order_all[:k]  # (k, h, w)
                pys, pxs = ys[sel], xs[sel]
                out[pys, pxs] = _eval_candidates(
                    flat, w, order, cand, y0, y1, ly, x0, x1, lx, pys, pxs
                )
    if not (inx.all() and iny.all()):
        out[~iny, :] = fill
        out[:, ~inx] = fill
    return out


def _dense_argmax(
    logits: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    ly: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    lx: np.ndarray,
) -> np.ndarray:
    """Bilinear upsample + argmax in row blocks: memory C x rows x W per block."""
    c = logits.shape[0]
    H, W = y0.size, x0.size
    out = np.empty((H, W), dtype=np.int64)
    rows = max(1, BLOCK_BYTES // (4 * c * W))
    one = np.float32(1)
    wx = lx[None, None, :]
    for r in range(0, H, rows):
        sl = slice(r, min(H, r + rows))
        wy = ly[sl][None, :, None]
        v = (one - wy) * logits[:, y0[sl]] + wy * logits[:, y1[sl]]  # (C, n, w)
        u = v[:, :, x0]
        u *= one - wx
        u += wx * v[:, :, x1]
        out[sl] = u.argmax(axis=0)
    return out


def _eval_candidates(
    flat: np.ndarray,
    w: int,
    order: np.ndarray,
    cand: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    ly: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    lx: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
) -> np.ndarray:
    result = np.empty(ys.size, dtype=np.int64)
    for s in range(0, ys.size, CHUNK):
        py, px = ys[s : s + CHUNK], xs[s : s + CHUNK]
        ry0, ry1, wy = y0[py], y1[py], ly[py][:, None]
        rx0, rx1, wx = x0[px], x1[px], lx[px][:, None]
        ks = order[:, ry0, rx0].T  # (n, k) class ids
        valid = cand[ks, ry0[:, None], rx0[:, None]]
        one = np.float32(1)
        # Same association as torch: h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11)
        top = (one - wx) * flat[ks, (ry0 * w + rx0)[:, None]] + wx * flat[
            ks, (ry0 * w + rx1)[:, None]
        ]
        bot = (one - wx) * flat[ks, (ry1 * w + rx0)[:, None]] + wx * flat[
            ks, (ry1 * w + rx1)[:, None]
        ]
        val = (one - wy) * top + wy * bot
        val[~valid] = -np.inf
        result[s : s + CHUNK] = ks[np.arange(ks.shape[0]), val.argmax(axis=1)]
    return result


class NumpySegmentHead:
    task = "segment"
    params = (Param("ignore_index", int, None, 0, 65535, help="class id outside the crop"),)
    #: a class map at the photo's size: real CPU, off the event loop
    heavy = True

    def __init__(self, model: ModelMeta) -> None:
        self.labels = list(model.labels)
        self.spec = model.preprocess

    def postprocess(
        self,
        outputs: list[np.ndarray],
        meta: ImageMeta,
        ignore_index: int | None = None,
        **_: Any,
    ) -> dict:
        logits = np.asarray(outputs[0])
        if logits.ndim != 3:
            raise ValueError(f"segmentation logits must be (C, h, w), got {logits.shape}")
        c, h, w = logits.shape
        W, H = meta.orig_size
        dtype = np.uint8 if c <= 255 else np.uint16
        fill = int(np.iinfo(dtype).max) if ignore_index is None else int(ignore_index)
        frame = model_frame(self.spec, (W, H), (h, w))
        cls = upsample_argmax(logits, (H, W), frame, fill=fill)
        mask = cls.astype(dtype)
        counts = np.bincount(mask.reshape(-1), minlength=c)
        total = max(int(counts[:c].sum()), 1)
        present = np.nonzero(counts[:c])[0]
        present = present[np.argsort(-counts[present], kind="stable")]
        return {
            "mask": mask,
            "classes": [
                {
                    "index": int(i),
                    "label": self._label(int(i)),
                    "fraction": float(counts[i] / total),
                }
                for i in present
            ],
            "ignore_index": fill,
        }

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"
