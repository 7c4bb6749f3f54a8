"""numba kernels of the segmentation head (see :mod:`cvserve.tasks.segment` for the maths).

Single-threaded and ``nogil``: the server runs heads on its preprocessing threads, so
requests run side by side instead of one request taking every core. Compiled on first
use and cached on disk (``cache=True``); :func:`warm_up` pays that at model load.
"""

from __future__ import annotations

import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

#: A class stays a candidate in a cell (or a run of one row) while its highest corner (end)
#: is within this fraction of the largest |logit| there of the best lowest one. A float32
#: bilinear value is off its exact one by at most ~6 ulp of that magnitude (3.6e-7), and a
#: test compares four such errors (1.4e-6); 1e-5 leaves a margin and still prunes.
SLACK = 1e-5


@intrinsic
def _fma(typingctx, a, b, c):  # noqa: ARG001 (numba's intrinsic signature)
    """``a * b + c`` rounded once, in float32: what torch's CPU kernel computes for
    ``t0 * w0 + t1 * w1`` where the compiler contracts it (x86-64 AVX2/AVX-512, arm64)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty)
        return builder.call(fn, args)

    return sig, codegen


@njit(cache=True, nogil=True)
def lerp(a, wa, b, wb):
    """torch's ``a * wa + b * wb`` as its AVX2 build computes it: ``fma(a, wa, b * wb)``."""
    return _fma(a, wa, b * wb)


@njit(cache=True, nogil=True)
def candidates(logits):
    """Per low-resolution cell ``(y, x)`` (corners: rows ``y, min(y+1, h-1)`` x columns
    ``x, min(x+1, w-1)``), the classes that can win at some point inside it, ascending.

    A class ``k`` can only win where ``max_corners(k) >= max_j min_corners(j)`` (bilinear
    values are convex combinations of the corners). CSR: the candidates of cell ``i`` are
    ``cls[start[i]:start[i + 1]]``; a cell with none (NaN logits) is evaluated over every
    class. One row of cells at a time, so its corners (C x 2 x w) stay in cache."""
    c, h, w = logits.shape
    n = h * w
    hi = np.empty((c, w), np.float32)
    vlo = np.empty(w, np.float32)
    vhi = np.empty(w, np.float32)
    best = np.empty(w, np.float32)
    amax = np.empty(w, np.float32)
    thr = np.empty(w, np.float32)
    cnt = np.empty(w, np.int64)
    pos = np.empty(w, np.int64)
    start = np.zeros(n + 1, np.int64)
    cls = np.empty(max(n, 16), np.int32)
    used = 0
    for y in range(h):
        yb = min(y + 1, h - 1)
        best[:] = -np.inf
        amax[:] = 0
        for k in range(c):
            ra = logits[k, y]
            rb = logits[k, yb]
            hk = hi[k]
            for x in range(w):  # written as selects so that LLVM vectorizes them
                a = ra[x]
                b = rb[x]
                vlo[x] = a if a < b else b
                vhi[x] = a if a > b else b
            for x in range(w - 1):
                lo = vlo[x] if vlo[x] < vlo[x + 1] else vlo[x + 1]
                top = vhi[x] if vhi[x] > vhi[x + 1] else vhi[x + 1]
                hk[x] = top
                best[x] = best[x] if best[x] > lo else lo
                m = top if top > -lo else -lo
                amax[x] = amax[x] if amax[x] > m else m
            x = w - 1  # the last column of cells: its right corners are its left ones
            hk[x] = vhi[x]
            best[x] = max(best[x], vlo[x])
            amax[x] = max(amax[x], max(vhi[x], -vlo[x]))
        for x in range(w):
            thr[x] = best[x] - np.float32(SLACK) * amax[x]
            cnt[x] = 0
        for k in range(c):  # count, then place: cells of one row are contiguous
            hk = hi[k]
            for x in range(w):
                cnt[x] += hk[x] >= thr[x]
        total = 0
        base = y * w
        for x in range(w):
            pos[x] = used + total
            total += cnt[x]
            start[base + x + 1] = used + total
        if used + total > cls.size:
            grown = np.empty(2 * cls.size + total, np.int32)
            grown[:used] = cls[:used]
            cls = grown
        for k in range(c):
            hk = hi[k]
            for x in range(w):
                if hk[x] >= thr[x]:
                    cls[pos[x]] = k
                    pos[x] += 1
        used += total
    return start, cls[:used]


@njit(cache=True, nogil=True)
def upsample_argmax(logits, start, cls, y0, y1, ly, x0, x1, lx, bands, runs, fill, out, counts):
    """Write the argmax of the bilinear upsampling of ``logits`` into ``out`` (H, W).

    Rows ``bands[0] <= Y < bands[-1]`` and columns ``runs[0] <= X < runs[-1]`` are inside
    the logits' frame; the rest get ``fill``. ``bands`` splits the inside rows into bands
    of one logit row ``y0``, ``runs`` the inside columns into runs of one logit column
    ``x0``: a band x run block lies in one cell. A block in a cell with one candidate class
    is filled with it. Otherwise the horizontal interpolations ``t = w0 * v0 + w1 * v1`` of
    the cell's candidates are computed once per block column and each row only does the
    vertical one, ``h0 * t_top + h1 * t_bottom``: torch's float32 association, each sum an
    fma; the first maximum wins. ``counts[k]`` gets the pixels of class ``k``."""
    c, h, w = logits.shape
    one = np.float32(1)
    ya, yb = bands[0], bands[-1]
    xa, xb = runs[0], runs[-1]
    out[:ya] = fill
    out[yb:] = fill
    out[ya:yb, :xa] = fill
    out[ya:yb, xb:] = fill
    longest = 1
    for r in range(runs.size - 1):
        longest = max(longest, runs[r + 1] - runs[r])
    t0 = np.empty((c, longest), np.float32)
    t1 = np.empty((c, longest), np.float32)
    bv = np.empty(longest, np.float32)
    bc = np.empty(longest, np.int32)
    ks = np.empty(c, np.int32)
    live = np.empty(c, np.int32)
    lo_end = np.empty(c, np.float32)
    hi_end = np.empty(c, np.float32)
    for b in range(bands.size - 1):
        Ya, Yb = bands[b], bands[b + 1]
        r0 = y0[Ya]
        r1 = y1[Ya]
        for r in range(runs.size - 1):
            X, E = runs[r], runs[r + 1]
            n = E - X
            cx = x0[X]
            cx1 = x1[X]
            cell = r0 * w + cx
            s, e = start[cell], start[cell + 1]
            if e - s == 1:
                k = cls[s]
                for Y in range(Ya, Yb):
                    out[Y, X:E] = k
                counts[k] += n * (Yb - Ya)
                continue
            m = 0
            if e == s:  # no candidate survived (NaN): every class
                for k in range(c):
                    ks[m] = k
                    m += 1
            else:
                for j in range(s, e):
                    ks[m] = cls[j]
                    m += 1
            big = np.float32(0)
            for j in range(m):
                k = ks[j]
                v00 = logits[k, r0, cx]
                v01 = logits[k, r0, cx1]
                v10 = logits[k, r1, cx]
                v11 = logits[k, r1, cx1]
                big = max(big, max(max(abs(v00), abs(v01)), max(abs(v10), abs(v11))))
                for i in range(n):
                    wx1 = lx[X + i]
                    wx0 = one - wx1
                    t0[j, i] = lerp(v00, wx0, v01, wx1)
                    t1[j, i] = lerp(v10, wx0, v11, wx1)
            slack = np.float32(SLACK) * big
            for Y in range(Ya, Yb):
                wy1 = ly[Y]
                wy0 = one - wy1
                # Along one row a class's value is linear in x: it can only win in this
                # run where its larger end reaches the best smaller end (less rounding).
                floor = np.float32(-np.inf)
                for j in range(m):
                    u = lerp(t0[j, 0], wy0, t1[j, 0], wy1)
                    v = lerp(t0[j, n - 1], wy0, t1[j, n - 1], wy1)
                    lo_end[j] = min(u, v)
                    hi_end[j] = max(u, v)
                    floor = max(floor, lo_end[j])
                floor -= slack
                q = 0
                for j in range(m):
                    if hi_end[j] >= floor:
                        live[q] = j
                        q += 1
                if q == 0:  # NaN: every candidate
                    for j in range(m):
                        live[j] = j
                    q = m
                row = out[Y]
                if q == 1:
                    k = ks[live[0]]
                    row[X:E] = k
                    counts[k] += n
                    continue
                j = live[0]
                k = ks[j]
                for i in range(n):
                    bv[i] = lerp(t0[j, i], wy0, t1[j, i], wy1)
                    bc[i] = k
                for p in range(1, q):
                    j = live[p]
                    k = ks[j]
                    for i in range(n):  # selects, not branches: LLVM vectorizes them
                        v = lerp(t0[j, i], wy0, t1[j, i], wy1)
                        better = v > bv[i]
                        bv[i] = v if better else bv[i]
                        bc[i] = k if better else bc[i]
                for i in range(n):
                    row[X + i] = bc[i]
                for p in range(q):
                    k = ks[live[p]]
                    hits = 0
                    for i in range(n):
                        hits += bc[i] == k
                    counts[k] += hits


@njit(cache=True, nogil=True)
def argmax_classes(logits, inside, fill, out, counts):
    """``out[y, x] = argmax_k logits[k, y, x]`` (first maximum) where ``inside``, else
    ``fill``; ``counts[k]`` gets the cells of class ``k``."""
    c, h, w = logits.shape
    best = np.empty(w, np.float32)
    idx = np.zeros(w, np.int32)
    for y in range(h):
        for x in range(w):
            best[x] = logits[0, y, x]
            idx[x] = 0
        for k in range(1, c):
            r = logits[k, y]
            for x in range(w):
                if r[x] > best[x]:
                    best[x] = r[x]
                    idx[x] = k
        for x in range(w):
            if inside[y, x]:
                out[y, x] = idx[x]
                counts[idx[x]] += 1
            else:
                out[y, x] = fill


def warm_up(dtype: np.dtype) -> float:
    """Compile (or load from the disk cache) every kernel for ``dtype`` output maps;
    returns the seconds it took (~0 when this process already had them)."""
    t0 = time.perf_counter()
    logits = np.zeros((3, 2, 2), np.float32)
    logits[1, 0, 0] = 1
    start, cls = candidates(logits)
    ax = np.array([0, 0, 1], np.int64)
    lam = np.zeros(3, np.float32)
    out = np.empty((3, 3), dtype)
    counts = np.zeros(3, np.int64)
    runs = np.array([0, 2, 3], np.int64)
    upsample_argmax(logits, start, cls, ax, ax, lam, ax, ax, lam, runs, runs, 0, out, counts)
    argmax_classes(logits, np.ones((2, 2), np.bool_), 0, np.empty((2, 2), dtype), counts)
    return time.perf_counter() - t0
