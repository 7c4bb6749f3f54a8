"""The export check compares task answers: float noise of any CPU passes, a wrong graph
fails with a message that says what differed and by how much."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.models.export_check import ExportMismatch, Tolerances, check_export

NOISE = 3e-3  # relative to each output's largest |value|: above what any CPU was seen to do


def _noisy(outputs: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (o + rng.uniform(-NOISE, NOISE, o.shape) * np.abs(o).max()).astype(np.float32)
        for o in outputs
    ]


def _logits(rng: np.random.Generator, n: int = 4, c: int = 10) -> np.ndarray:
    return (rng.normal(size=(n, c)) * 3).astype(np.float32)


def _detector(rng: np.random.Generator, q: int = 30, c: int = 6) -> list[np.ndarray]:
    logits = (rng.normal(size=(2, q, c)) * 2).astype(np.float32)
    cxcy = rng.uniform(0.2, 0.8, size=(2, q, 2))
    wh = rng.uniform(0.01, 0.5, size=(2, q, 2))  # tiny boxes too
    return [logits, np.concatenate([cxcy, wh], axis=-1).astype(np.float32)]


def _seg(rng: np.random.Generator) -> np.ndarray:
    return rng.normal(size=(2, 5, 16, 16)).astype(np.float32)


def _depth(rng: np.random.Generator) -> np.ndarray:
    return np.abs(rng.normal(size=(2, 28, 28)) * 4).astype(np.float32)


CASES = {
    "classify": (("logits",), lambda rng: [_logits(rng)]),
    "detect-sigmoid": (("logits", "pred_boxes"), _detector),
    "detect-softmax": (("logits", "pred_boxes"), _detector),
    "segment": (("logits",), lambda rng: [_seg(rng)]),
    "depth": (("predicted_depth",), lambda rng: [_depth(rng)]),
}


def _check(case: str, refs, gots, **kw):
    task, _, score = case.partition("-")
    names = CASES[case][0]
    return check_export(task, names, refs, gots, score=score or "softmax", input_hw=(64, 64), **kw)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", range(5))
def test_float_noise_passes(case: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    refs = CASES[case][1](rng)
    got = _noisy(refs, seed + 100)
    summary = _check(case, refs, got)
    assert 0 < summary["rel"] <= NOISE * 1.01
    # and the old raw bound (1e-3 of the largest value) would have refused it
    assert summary["rel"] > 1e-3


def test_classify_swapped_classes_fail_naming_the_ranks() -> None:
    ref = _logits(np.random.default_rng(1))
    best = ref.argmax(axis=1)
    got = ref.copy()
    worst = ref.argmin(axis=1)
    rows = np.arange(len(ref))
    got[rows, best], got[rows, worst] = ref[rows, worst], ref[rows, best]
    with pytest.raises(ExportMismatch, match=r"image 0: top-5 classes differ: torch \[") as e:
        _check("classify", [ref], [got])
    assert "at rank 1" in str(e.value) and "a tie is <" in str(e.value)


def test_classify_near_ties_may_trade_places() -> None:
    ref = np.array([[5.0, 4.99, 1.0, 0.0, -1.0, -2.0, -3.0]], dtype=np.float32)
    got = np.array([[4.99, 5.0, 1.0, 0.0, -1.0, -2.0, -3.0]], dtype=np.float32)
    assert _check("classify", [ref], [got])["top_k_agree"] == 5


def test_classify_scores_that_drift_fail_with_the_score_and_limit() -> None:
    ref = np.array([[3.0, 0.0, -0.5, -1.0, -1.5, -2.0]], dtype=np.float32)
    got = ref + np.array([[0.3, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    with pytest.raises(ExportMismatch, match=r"score is .* \(\|diff\| .*, limit 0.02\)"):
        _check("classify", [ref], [got], tol=Tolerances(gross=1.0))


@pytest.mark.parametrize("case", ["detect-sigmoid", "detect-softmax"])
def test_detect_moved_boxes_fail_with_the_iou(case: str) -> None:
    refs = _detector(np.random.default_rng(2))
    boxes = refs[1].copy()
    boxes[..., 0] += 0.1  # every box 6.4 px to the right
    with pytest.raises(ExportMismatch, match=r"has no match in ONNX: .* IoU") as e:
        _check(case, refs, [refs[0], boxes], tol=Tolerances(gross=1.0))
    assert "limit 0.9, or every side within 2.0 px" in str(e.value)


def test_detect_relabelled_queries_fail() -> None:
    refs = _detector(np.random.default_rng(3))
    logits = refs[0][:, :, ::-1].copy()  # class c -> class C-1-c
    with pytest.raises(ExportMismatch, match=r"query \d+ \(label \d+, score"):
        _check("detect-sigmoid", refs, [logits, refs[1]])


def test_detect_matches_queries_that_trade_places() -> None:
    refs = _detector(np.random.default_rng(4))
    perm = np.random.default_rng(5).permutation(refs[0].shape[1])
    got = [refs[0][:, perm], refs[1][:, perm]]
    summary = _check("detect-sigmoid", refs, got, tol=Tolerances(gross=10.0))
    assert summary["min_iou"] == 1.0 and summary["detections_compared"] > 0


def test_segment_wrong_map_fails_with_the_agreement() -> None:
    ref = _seg(np.random.default_rng(6))
    got = np.roll(ref, 1, axis=1)  # every pixel's classes rotated
    with pytest.raises(ExportMismatch, match=r"image 0: class maps agree on \d+\.\d+% of 256"):
        _check("segment", [ref], [got], tol=Tolerances(gross=10.0))


def test_depth_off_by_two_percent_fails() -> None:
    ref = _depth(np.random.default_rng(7))
    got = ref.copy()
    got[1, 3, 4] += 0.02 * np.abs(ref[1]).max()
    with pytest.raises(ExportMismatch, match=r"image 1: depth differs by .* at \(3, 4\)"):
        _check("depth", [ref], [got])


def test_shapes_and_non_finite_values_fail() -> None:
    ref = _logits(np.random.default_rng(8))
    with pytest.raises(ExportMismatch, match=r"ONNX shape \(4, 9\) != torch \(4, 10\)"):
        _check("classify", [ref], [ref[:, :9]])
    bad = ref.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ExportMismatch, match="NaN or inf"):
        _check("classify", [ref], [bad])


def test_gross_bound_catches_what_the_answer_hides() -> None:
    ref = _logits(np.random.default_rng(9))
    got = ref + 1.0  # softmax and top-k cannot see a constant shift; the raw bound can
    with pytest.raises(
        ExportMismatch, match=r"output 'logits': max \|diff\| 1 is .* \(limit 0.05\)"
    ):
        _check("classify", [ref], [got])
