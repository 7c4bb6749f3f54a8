"""numba kernels of the fused resize + crop + normalize (see :func:`cvserve.images.transforms.
resample_into`): Pillow's separable resampling filters, computed in float32 on only the
pixels that reach the model input, written normalized straight into the batch slot.

Single-threaded and ``nogil`` (the server runs them on its preprocessing threads),
compiled on first use of each tap bucket and layout (~2.5 s each on a cold cache) and
cached on disk (``cache=True``; ~0.1 s to load); :func:`warm_up` compiles every one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Filter ids and their support (Pillow's ``Resample.c``), by PreprocessSpec name.
FILTERS = {"box": (0, 0.5), "bilinear": (1, 1.0), "hamming": (2, 1.0), "bicubic": (3, 2.0),
           "lanczos": (4, 3.0)}  # fmt: skip
#: Tap counts with a kernel specialised for them (a constant trip count lets LLVM
#: vectorise the horizontal dot product); more taps use the generic loop.
TAP_BUCKETS = (4, 8, 12, 16, 24, 32)


@njit(cache=True, nogil=True)
def _filter(fid, x):
    if fid == 0:  # box
        return 1.0 if -0.5 < x <= 0.5 else 0.0
    x = abs(x)
    if fid == 1:  # bilinear (triangle)
        return 1.0 - x if x < 1.0 else 0.0
    if fid == 2:  # hamming
        if x == 0.0:
            return 1.0
        if x >= 1.0:
            return 0.0
        x *= math.pi
        return math.sin(x) / x * (0.54 + 0.46 * math.cos(x))
    if fid == 3:  # bicubic, a = -0.5
        a = -0.5
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0
    if x >= 3.0:  # lanczos, a = 3
        return 0.0
    if x == 0.0:
        return 1.0
    px = math.pi * x
    return math.sin(px) / px * math.sin(px / 3.0) / (px / 3.0)


@njit(cache=True, nogil=True)
def coefficients(in_size, in0, in1, out_size, fid, support, bucket):
    """Pillow's ``precompute_coeffs`` for one axis: the first source index and the
    normalised float32 weights of every output, zero-padded to the smallest of
    ``TAP_BUCKETS`` that holds them when ``bucket`` (padded taps may index past the source:
    their weight is 0 and the kernel stops at its edge)."""
    scale = (in1 - in0) / out_size
    fscale = max(scale, 1.0)
    sup = support * fscale
    need = 1
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        lo = max(int(center - sup + 0.5), 0)
        hi = min(int(center + sup + 0.5), in_size)
        need = max(need, hi - lo)
    taps = need
    if bucket:
        for b in (4, 8, 12, 16, 24, 32):
            if need <= b:
                taps = b
                break
    first = np.empty(out_size, np.int64)
    w = np.zeros((out_size, taps), np.float32)
    tmp = np.empty(taps, np.float64)
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        lo = max(int(center - sup + 0.5), 0)
        hi = min(int(center + sup + 0.5), in_size)
        total = 0.0
        for i in range(hi - lo):
            v = _filter(fid, (i + lo - center + 0.5) / fscale)
            tmp[i] = v
            total += v
        first[xx] = lo
        for i in range(hi - lo):
            w[xx, i] = tmp[i] / total if total != 0.0 else tmp[i]
    return first, w


@njit(cache=True, nogil=True, inline="always")
def _clip(v):
    return min(max(v, np.float32(0.0)), np.float32(255.0))


@njit(cache=True, nogil=True, inline="always")
def _pixel(v):
    """``v`` clipped to 0..255 and rounded half up, as Pillow's ``clip8``."""
    return np.float32(math.floor(min(max(v, np.float32(0.0)), np.float32(255.0)) + 0.5))


@njit(cache=True, nogil=True, fastmath=True)
def resample_normalize(a, ix, wx, iy, wy, scale, shift, chan, out, kk, rounded):
    """``out[c] = clip(resample(a)[..., chan[c]], 0, 255) * scale[c] + shift[c]``, the
    clipped value rounded to an 8-bit pixel when ``rounded`` (uint8 slots).

    ``a``: (H, W, 3) uint8, C-contiguous; ``ix``/``wx`` and ``iy``/``wy``: each axis's
    first source index and weights (:func:`coefficients`); ``out``: (3, oh, ow) float32
    or uint8 (``scale`` 1, ``shift`` 0), any strides. Vertical pass first, over the contiguous rows of the crop (vectorised),
    then horizontal per planar row. ``kk``: a tuple whose length is the horizontal tap
    count (a compile-time constant), or empty for any ``wx.shape[1]``."""
    K = len(kk)
    if K == 0:
        K = wx.shape[1]
    height, width = a.shape[0], a.shape[1]
    oh = iy.shape[0]
    ow = ix.shape[0]
    ky = wy.shape[1]
    c0 = ix[0]
    c1 = min(ix[ow - 1] + K, width)
    m = c1 - c0
    n = m * 3
    flat = a.reshape(height, width * 3)
    row = np.empty(n, np.float32)
    planes = np.zeros((3, m + K), np.float32)
    for y in range(oh):
        r0 = iy[y]
        w = wy[y, 0]
        src = flat[r0, c0 * 3 : c1 * 3]
        for j in range(n):
            row[j] = w * src[j]
        for k in range(1, ky):
            if r0 + k >= height:
                break
            w = wy[y, k]
            src = flat[r0 + k, c0 * 3 : c1 * 3]
            for j in range(n):
                row[j] += w * src[j]
        for j in range(m):
            planes[0, j] = row[3 * j]
            planes[1, j] = row[3 * j + 1]
            planes[2, j] = row[3 * j + 2]
        # the three channels together: one load of each weight for three dot products
        # (20% faster than a channel at a time)
        pa = planes[chan[0]]
        pb = planes[chan[1]]
        pc = planes[chan[2]]
        oa = out[0, y]
        ob = out[1, y]
        oc = out[2, y]
        for x in range(ow):
            b = ix[x] - c0
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            for k in range(K):
                w = wx[x, k]
                a0 += w * pa[b + k]
                a1 += w * pb[b + k]
                a2 += w * pc[b + k]
            # clipped to the 8-bit range as Pillow's (and so HF's) pixels are; rounded only
            # for uint8 slots: float slots keep the fraction (closer to the reference)
            if rounded:
                a0, a1, a2 = _pixel(a0), _pixel(a1), _pixel(a2)
            else:
                a0, a1, a2 = _clip(a0), _clip(a1), _clip(a2)
            oa[x] = a0 * scale[0] + shift[0]
            ob[x] = a1 * scale[1] + shift[1]
            oc[x] = a2 * scale[2] + shift[2]


def warm_up() -> None:
    """Compile (or load from the disk cache) the kernel for every tap bucket and both
    slot layouts (NCHW: a C-contiguous view; NHWC: a strided one)."""
    a = np.zeros((64, 64, 3), np.uint8)
    ones = np.ones(3, np.float32)
    chan = np.arange(3, dtype=np.int64)
    iy, wy = coefficients(64, 0.0, 64.0, 2, 3, 2.0, True)
    for taps in (*TAP_BUCKETS, 0):
        ix = np.zeros(2, np.int64)
        wx = np.zeros((2, taps or 40), np.float32)
        for view in (
            np.zeros((3, 2, 2), np.float32),
            np.zeros((2, 2, 3), np.float32).transpose(2, 0, 1),
        ):
            resample_normalize(a, ix, wx, iy, wy, ones, ones, chan, view, (0,) * taps, False)
