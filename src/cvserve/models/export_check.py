"""Check an exported model on what it is for: the answer its task gives, not raw floats.

Two runs of one float32 graph on two CPUs differ in the last bits (fused multiply-adds,
AVX2 against AVX-512 against NEON, another summation order), and deep random-weight
models amplify that to ~1e-3 of the largest logit. So a build's check compares what a
user would see, torch's answer against ONNX Runtime's on the same inputs, with tolerances
that such noise stays far inside and a wrong graph does not:

* ``classify``: the top-k classes agree, up to near-ties (classes whose torch logits are
  closer than ``tie`` of the logits' range may trade places), and softmax scores differ
  by at most ``score_atol``.
* ``detect``: every query's best detection, on either side, has a partner on the other
  side with the same label, a score within ``score_atol`` and a box with IoU >= ``iou``
  (or every side within ``box_px`` input pixels: tiny boxes), whatever its score: a
  random-weight detector scores every query alike, so no threshold would leave any.
* ``segment``: the argmax class maps agree on at least ``min_agreement`` of the pixels,
  and every pixel that differs is a near-tie in torch's logits.
* ``depth``: the largest error is at most ``depth_rel`` of the largest depth.
* ``embed``: each image's L2-normalised vectors have a cosine similarity of at least
  ``min_cosine``.

Every output is also held to a loose bound on its raw values (``gross``), which catches
a broken output the task's answer does not look at. The error says what differed, where,
and by how much against which limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ExportMismatch", "Tolerances", "check_export", "detection_scores"]


class ExportMismatch(ValueError):
    """The exported graph's answers differ from torch's; the message says how."""


@dataclass(frozen=True)
class Tolerances:
    """What "the same answer" means; a correct export on any x86 or ARM CPU stays inside.

    Measured: the largest disagreement seen between a correct export and torch is ~2e-3
    of the largest logit (RT-DETR on an AVX-512 Xeon); every limit here is 5x or more
    above what noise of that size can do.
    """

    #: classes (or pixels' classes) whose torch logits are closer than this fraction of the
    #: logits' range (max - min) are a tie, and may come out in either order
    tie: float = 0.02
    #: softmax / sigmoid scores: largest absolute difference
    score_atol: float = 0.02
    #: classification: how many of the best classes must agree
    top_k: int = 5
    #: detection: boxes match at this IoU or better ...
    iou: float = 0.9
    #: ... or with every side within this many model-input pixels (tiny boxes)
    box_px: float = 2.0
    #: segmentation: fraction of pixels whose class must agree
    min_agreement: float = 0.98
    #: depth: largest |error| over the largest |depth|
    depth_rel: float = 0.01
    #: embeddings: cosine similarity of torch's and ONNX's vector of each image
    min_cosine: float = 0.999
    #: any output: largest |diff| over its largest |value|
    gross: float = 0.05


TOLERANCES = Tolerances()


def check_export(
    task: str,
    names: Sequence[str],
    refs: Sequence[np.ndarray],
    gots: Sequence[np.ndarray],
    *,
    score: str = "softmax",
    input_hw: tuple[int, int] = (1, 1),
    tol: Tolerances = TOLERANCES,
) -> dict[str, Any]:
    """Compare ONNX Runtime's outputs ``gots`` with torch's ``refs`` (same order as
    ``names``, batch first) on ``task``'s answer; raise ExportMismatch when they differ.

    ``score`` is how a detector's logits become scores (``sigmoid`` or ``softmax``, the
    last class being "no object"); ``input_hw`` is the model input's size (box tolerance).
    Returns the numbers measured (for the model's metadata).
    """
    if len(refs) != len(names) or len(gots) != len(names):
        raise ExportMismatch(f"ONNX gives {len(gots)} outputs, torch {len(refs)}, want {names}")
    refs = [np.asarray(r, dtype=np.float64) for r in refs]
    gots = [np.asarray(g, dtype=np.float64) for g in gots]
    for name, ref, got in zip(names, refs, gots, strict=True):
        if got.shape != ref.shape:
            raise ExportMismatch(f"output {name!r}: ONNX shape {got.shape} != torch {ref.shape}")
        if not np.isfinite(got).all() and np.isfinite(ref).all():
            raise ExportMismatch(f"output {name!r}: ONNX gives NaN or inf where torch does not")
    # The task's answer first: its message says the most about what is wrong.
    if task == "classify":
        summary = _classify(refs[0], gots[0], tol)
    elif task == "detect":
        summary = _detect(refs[0], refs[1], gots[0], gots[1], score, input_hw, tol)
    elif task == "segment":
        summary = _segment(refs[0], gots[0], tol)
    elif task == "depth":
        summary = _depth(refs[0], gots[0], tol)
    elif task == "embed":
        summary = _embed(refs[0], gots[0], tol)
    else:
        summary = {}
    max_abs = rel = 0.0
    for name, ref, got in zip(names, refs, gots, strict=True):
        diff = float(np.abs(got - ref).max()) if ref.size else 0.0
        scale = max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-12)
        if not diff / scale <= tol.gross:
            raise ExportMismatch(
                f"output {name!r}: max |diff| {diff:.3g} is {diff / scale:.3g} of its largest "
                f"value {scale:.3g} (limit {tol.gross})"
            )
        max_abs, rel = max(max_abs, diff), max(rel, diff / scale)
    return {"max_abs": max_abs, "rel": rel, **summary}


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _classify(ref: np.ndarray, got: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    ref, got = ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)
    k = min(tol.top_k, ref.shape[1])
    worst_score = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        r_idx = np.argsort(-r, kind="stable")[:k]
        g_idx = np.argsort(-g, kind="stable")[:k]
        for a, idx_a, idx_b, who in (
            (r, r_idx, g_idx, "torch"),
            (g, g_idx, r_idx, "ONNX"),
        ):
            # rank by rank: the class the other side put at rank j must score, in this
            # side's logits, within the tie margin of this side's own rank-j class
            margin = tol.tie * max(float(a.max() - a.min()), 1e-12)
            lag = a[idx_a] - a[idx_b]
            j = int(lag.argmax())
            if lag[j] > margin:
                raise ExportMismatch(
                    f"image {i}: top-{k} classes differ: torch {r_idx.tolist()}, ONNX "
                    f"{g_idx.tolist()}; at rank {j + 1}, {who}'s logits put class "
                    f"{int(idx_b[j])} {lag[j]:.3g} below class {int(idx_a[j])} (a tie is "
                    f"< {margin:.3g}, {tol.tie} of the logits' range)"
                )
        pr, pg = _softmax(r), _softmax(g)
        d = np.abs(pr - pg)
        c = int(d.argmax())
        if d[c] > tol.score_atol:
            raise ExportMismatch(
                f"image {i}: class {c}'s score is {pg[c]:.4f} in ONNX, {pr[c]:.4f} in torch "
                f"(|diff| {d[c]:.3g}, limit {tol.score_atol})"
            )
        worst_score = max(worst_score, float(d[c]))
    return {"top_k_agree": k, "max_score_diff": worst_score}


def detection_scores(logits: np.ndarray, score: str) -> np.ndarray:
    """(Q, C) logits to per-(query, class) scores as the detect head scores them:
    ``sigmoid`` of each logit, or ``softmax`` over the classes with the last ("no object")
    class dropped."""
    if score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if score == "softmax":
        return _softmax(logits, axis=-1)[..., :-1]
    raise ValueError(f"score must be 'sigmoid' or 'softmax', got {score!r}")


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of a[k] with b[k] for every k."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = _area(a) + _area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = _area(box) + _area(boxes) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _detect(
    ref_logits: np.ndarray,
    ref_boxes: np.ndarray,
    got_logits: np.ndarray,
    got_boxes: np.ndarray,
    score: str,
    input_hw: tuple[int, int],
    tol: Tolerances,
) -> dict[str, Any]:
    h, w = input_hw
    px = np.array([w, h, w, h], dtype=np.float64)
    worst_iou, worst_score, compared = 1.0, 0.0, 0
    for i in range(ref_logits.shape[0]):
        sides = {
            "torch": (detection_scores(ref_logits[i], score), _xyxy(ref_boxes[i])),
            "ONNX": (detection_scores(got_logits[i], score), _xyxy(got_boxes[i])),
        }
        for mine, other in (("torch", "ONNX"), ("ONNX", "torch")):
            s_a, b_a = sides[mine]
            s_b, b_b = sides[other]
            queries = np.arange(s_a.shape[0])
            labels = s_a.argmax(axis=1)
            sa = s_a[queries, labels]
            # Each query's best detection must come out of the other side too: the same
            # label at a score within score_atol, at the same box. Usually it is the same
            # query; a query that traded places with another is looked for among them all.
            ds = np.abs(s_b[queries, labels] - sa)
            ious = _iou_pairs(b_a, b_b)
            close = (np.abs(b_b - b_a) * px).max(axis=1) <= tol.box_px
            same = (ds <= tol.score_atol) & ((ious >= tol.iou) | close)
            for qa in np.flatnonzero(~same):
                lab = int(labels[qa])
                iou_all = _iou(b_a[qa], b_b)
                near = (np.abs(b_b - b_a[qa]) * px).max(axis=1) <= tol.box_px
                score_ok = np.abs(s_b[:, lab] - sa[qa]) <= tol.score_atol
                ok = score_ok & ((iou_all >= tol.iou) | near)
                if not ok.any():
                    best = float(iou_all[score_ok].max()) if score_ok.any() else 0.0
                    raise ExportMismatch(
                        f"image {i}: {mine}'s query {int(qa)} (label {lab}, score "
                        f"{float(sa[qa]):.4f}, box {np.round(b_a[qa] * px, 1).tolist()} px) has "
                        f"no match in {other}: there the same query scores label {lab} "
                        f"{float(s_b[qa, lab]):.4f} (limit +-{tol.score_atol}) with IoU "
                        f"{float(ious[qa]):.3f}; the best IoU at a matching score is {best:.3f} "
                        f"(limit {tol.iou}, or every side within {tol.box_px} px)"
                    )
                m = int(np.argmax(np.where(ok, iou_all, -1.0)))
                ious[qa] = 1.0 if near[m] else iou_all[m]
                ds[qa] = abs(float(s_b[m, lab]) - float(sa[qa]))
                close[qa] = near[m]
            worst_iou = min(worst_iou, float(np.where(close, 1.0, ious).min()))
            worst_score = max(worst_score, float(ds.max()))
            compared += len(queries)
    return {"detections_compared": compared, "min_iou": worst_iou, "max_score_diff": worst_score}


def _segment(ref: np.ndarray, got: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    worst = 1.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        r_map, g_map = r.argmax(axis=0), g.argmax(axis=0)
        differ = r_map != g_map
        agreement = 1.0 - float(differ.mean())
        margin = tol.tie * max(float(r.max() - r.min()), 1e-12)
        rr = r.reshape(r.shape[0], -1)
        flat = np.flatnonzero(differ.reshape(-1))
        lead = rr[r_map.reshape(-1)[flat], flat] - rr[g_map.reshape(-1)[flat], flat]
        decisive = int((lead > margin).sum())
        if agreement < tol.min_agreement or decisive:
            y, x = np.unravel_index(flat[int(lead.argmax())], r_map.shape) if flat.size else (0, 0)
            raise ExportMismatch(
                f"image {i}: class maps agree on {agreement:.2%} of {r_map.size} pixels "
                f"(limit {tol.min_agreement:.0%}); {decisive} differing pixels are not ties "
                f"(largest: at y={int(y)} x={int(x)} torch's class leads ONNX's by "
                f"{float(lead.max()) if lead.size else 0.0:.3g}, a tie is < {margin:.3g})"
            )
        worst = min(worst, agreement)
    return {"class_map_agreement": worst}


def _depth(ref: np.ndarray, got: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        scale = max(float(np.abs(r).max()), 1e-12)
        d = np.abs(g - r)
        err = float(d.max()) / scale
        if err > tol.depth_rel:
            at = np.unravel_index(int(d.argmax()), d.shape)
            raise ExportMismatch(
                f"image {i}: depth differs by {float(d.max()):.3g} at {tuple(int(a) for a in at)} "
                f"({err:.3g} of the largest depth {scale:.3g}, limit {tol.depth_rel})"
            )
        worst = max(worst, err)
    return {"depth_rel_error": worst}


def _embed(ref: np.ndarray, got: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    r = ref.reshape(len(ref), -1)
    g = got.reshape(len(got), -1)
    rn = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.einsum("ij,ij->i", r, g) / np.maximum(rn, 1e-300)
    worst = int(cos.argmin()) if cos.size else 0
    if cos.size and not cos[worst] >= tol.min_cosine:
        raise ExportMismatch(
            f"image {worst}: embedding cosine similarity {float(cos[worst]):.6f} "
            f"(limit {tol.min_cosine})"
        )
    return {"embedding_min_cosine": float(cos.min()) if cos.size else 1.0}
