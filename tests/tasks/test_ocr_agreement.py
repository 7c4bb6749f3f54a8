"""cvserve's OCR steps against RapidOCR 1.4.4's own end-to-end OCR on every OCR image.

Both get the same pixels: cvserve's decoder output (upright, EXIF applied), given to
RapidOCR as the BGR array it expects for ndarray input. Both run the package's default
configuration: PP-OCRv4 det + rec with the angle classifier on (``use_cls: true``).
"""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon

from cvserve.tasks.ocr import Line

from .conftest import ocr_files


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_similarity(a: str, b: str) -> float:
    return 1.0 - levenshtein(a, b) / max(len(a), len(b), 1)


def box_iou(a, b) -> float:
    pa, pb = Polygon(np.asarray(a, dtype=float)), Polygon(np.asarray(b, dtype=float))
    if not (pa.is_valid and pb.is_valid):
        pa, pb = pa.buffer(0), pb.buffer(0)
    union = pa.union(pb).area
    return pa.intersection(pb).area / union if union > 0 else 0.0


def compare(ref: list, ours: list[Line]) -> dict:
    """Match each reference line to our unmatched line of highest IoU (IoU > 0.5 to
    count); similarity is averaged over matched pairs and unmatched lines of either
    side (an unmatched line scores 0)."""
    free = set(range(len(ours)))
    sims, ious = [], []
    for box, text, _score in ref:
        best = max(free, key=lambda j: box_iou(box, ours[j].box), default=None)
        if best is None or box_iou(box, ours[best].box) <= 0.5:
            sims.append(0.0)
            continue
        free.discard(best)
        ious.append(box_iou(box, ours[best].box))
        sims.append(char_similarity(text, ours[best].text))
    sims.extend(0.0 for _ in free)
    return {
        "similarity": float(np.mean(sims)) if sims else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else 1.0,
        "min_iou": float(np.min(ious)) if ious else 1.0,
        "ours": len(ours),
        "ref": len(ref),
    }


def test_helpers_measure_what_they_say():
    assert levenshtein("kitten", "sitting") == 3
    assert char_similarity("abcd", "abcd") == 1.0
    assert char_similarity("abcd", "abed") == 0.75
    sq = [[0, 0], [10, 0], [10, 10], [0, 10]]
    assert box_iou(sq, sq) == pytest.approx(1.0)
    assert box_iou(sq, [[5, 0], [15, 0], [15, 10], [5, 10]]) == pytest.approx(1 / 3)
    line = Line(box=np.array(sq, dtype=np.float32), text="abcd", score=0.9)
    assert compare([(sq, "abed", 0.9)], [line])["similarity"] == 0.75
    assert compare([(sq, "abcd", 0.9)], [])["similarity"] == 0.0
    assert compare([], [line])["similarity"] == 0.0


def test_every_ocr_image_is_compared(data_dir):
    """The parametrization of the comparison below covers every file of data/ocr."""
    on_disk = sorted(f"ocr/{p.name}" for p in (data_dir / "ocr").iterdir())
    assert on_disk and ocr_files() == on_disk


def test_agrees_with_rapidocr(ocr_file, data_dir, load_rgb, ocr_pipeline, rapid_ocr):
    rgb = load_rgb(data_dir / ocr_file)
    ref, _ = rapid_ocr(np.ascontiguousarray(rgb[:, :, ::-1]))
    ours = ocr_pipeline(rgb)
    m = compare(ref or [], ours)
    assert m["similarity"] >= 0.98, m
    assert m["min_iou"] >= 0.9, m
    assert m["ours"] == m["ref"], m
    for line in ours:  # boxes lie in the original image
        assert line.box.shape == (4, 2)
        assert (line.box >= 0).all()
        assert (line.box[:, 0] <= rgb.shape[1]).all() and (line.box[:, 1] <= rgb.shape[0]).all()
        assert line.score >= 0.5


def test_known_texts(data_dir, load_rgb, ocr_pipeline):
    """Independent of the reference: what the images say (MANIFEST notes, repo tests)."""
    upright = ocr_pipeline(load_rgb(data_dir / "ocr/img_exif_orientation.jpg"))
    assert upright[0].text == "我是中国人"
    en = ocr_pipeline(load_rgb(data_dir / "ocr/en.jpg"))
    assert en[0].text == "3" and en[1].text == "MovieShots"
    sign = [line.text for line in ocr_pipeline(load_rgb(data_dir / "ocr/ger_1.jpg"))]
    assert sign[:2] == ["EPPING", "Twinned with"]
