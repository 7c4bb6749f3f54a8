"""The OCR steps one by one, against hand-made cases and float64 numpy references."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from cvserve.models.ocr_files import ocr_model_files, read_dictionary
from cvserve.tasks.ocr_det import (
    DetConfig,
    DetMeta,
    box_score,
    db_postprocess,
    det_input_size,
    det_preprocess,
    mini_box,
    order_points_clockwise,
    reading_order,
    to_original,
    unclip,
)
from cvserve.tasks.ocr_rec import (
    RecConfig,
    cls_postprocess,
    cls_preprocess,
    crop_text_region,
    ctc_decode,
    ctc_labels,
    padding_fraction,
    plan_batches,
    rec_preprocess,
    rec_width,
)

# --- CTC ------------------------------------------------------------------------------

LABELS = ctc_labels(["a", "b", "c"])  # blank=0, a=1, b=2, c=3, space=4


def one_hot(seq: list[int], p: float = 0.9) -> np.ndarray:
    out = np.full((len(seq), len(LABELS)), (1 - p) / (len(LABELS) - 1), dtype=np.float32)
    out[np.arange(len(seq)), seq] = p
    return out


def test_ctc_labels_put_blank_first_and_space_last():
    assert LABELS == ["blank", "a", "b", "c", " "]


def test_ctc_collapses_repeats_and_drops_blanks():
    # a a _ a b b _ _ space c c  ->  "aab c": the blank separates the two a's.
    seq = [1, 1, 0, 1, 2, 2, 0, 0, 4, 3, 3]
    probs = one_hot(seq)
    probs[0, 1] = 0.6  # the kept step of a repeat is its first
    [(text, score)] = ctc_decode(probs[None], LABELS)
    assert text == "aab c"
    kept = [0.6, 0.9, 0.9, 0.9, 0.9]  # steps 0, 3, 4, 8, 9
    assert score == pytest.approx(np.mean(kept), rel=1e-6)


def test_ctc_all_blank_is_empty_with_zero_score_and_rows_are_independent():
    batch = np.stack([one_hot([0, 0, 0, 0]), one_hot([2, 0, 2, 2])])
    assert ctc_decode(batch, LABELS) == [("", 0.0), ("bb", pytest.approx(0.9))]


def test_ctc_rejects_a_dictionary_of_the_wrong_size():
    with pytest.raises(ValueError, match="expected"):
        ctc_decode(np.zeros((1, 4, 3), np.float32), LABELS)


def test_packaged_dictionary_matches_the_recognizer_classes():
    import onnxruntime as ort

    files = ocr_model_files()
    chars = read_dictionary(files.rec)
    session = ort.InferenceSession(str(files.rec), providers=["CPUExecutionProvider"])
    assert len(ctc_labels(chars)) == session.get_outputs()[0].shape[-1] == 6625
    assert "中" in chars and "A" in chars and len(set(chars)) == len(chars)


def test_dictionary_text_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_bytes("a\nb\r\n\u2028\n".encode())  # a line separator is a character
    assert read_dictionary(path) == ["a", "b", "\u2028"]


# --- detection preprocessing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "want"),
    [
        (500, 500, (736, 736)),  # shorter side scaled up to 736
        (1048, 1680, (1056, 1664)),  # big enough: only rounded to 32 (half to even)
        (132, 709, (736, 3968)),
    ],
)
def test_det_input_size(h, w, want):
    assert det_input_size(h, w) == want


def test_det_preprocess_normalizes_bgr_chw_like_float64_numpy():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (736, 768, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)  # pure red
    det = det_preprocess(rgb)
    assert det.tensor.shape == (3, 736, 768) and det.tensor.dtype == np.float32
    want = (rgb[:, :, ::-1].astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(det.tensor, want.transpose(2, 0, 1), atol=1e-6)
    assert det.tensor[:, 0, 0].tolist() == [-1.0, -1.0, 1.0]  # B, G, R
    assert det.image is rgb  # nothing to resize, letterbox or copy


def test_wide_image_is_letterboxed_and_boxes_map_back():
    rgb = np.full((100, 1000, 3), 200, np.uint8)  # 10:1, wider than 8:1
    det = det_preprocess(rgb)
    pad = det.meta.pad_top
    assert pad == (max(1000 // 8, 30) * 2 - 100) // 2 == 75
    assert det.image.shape == (250, 1000, 3)
    assert (det.image[:pad] == 0).all() and (det.image[pad:-pad] == 200).all()
    box = np.array([[[10, pad + 5], [90, pad + 5], [90, pad + 25], [10, pad + 25]]])
    np.testing.assert_array_equal(
        to_original(box, det.meta)[0], [[10, 5], [90, 5], [90, 25], [10, 25]]
    )


def test_big_image_is_scaled_down_and_boxes_map_back():
    rgb = np.zeros((1000, 3000, 3), np.uint8)
    det = det_preprocess(rgb)
    assert det.meta.work_size == (672, 1984)  # 2000/3000 scale, each side to 32s
    assert det.meta.scale == (1000 / 672, 3000 / 1984)
    back = to_original(np.array([[[1984, 672]] * 4]), det.meta)
    np.testing.assert_allclose(back[0, 0], [3000, 1000], rtol=1e-6)


def test_det_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8 RGB"):
        det_preprocess(np.zeros((10, 10), np.uint8))


# --- DB post-processing helpers -------------------------------------------------------


def test_order_points_clockwise_from_any_order():
    tl, tr, br, bl = [10, 12], [50, 10], [52, 30], [12, 32]
    for perm in ([br, tl, bl, tr], [tr, bl, tl, br], [bl, br, tr, tl]):
        got = order_points_clockwise(np.array(perm, dtype=np.float32))
        np.testing.assert_array_equal(got, [tl, tr, br, bl])


def test_mini_box_of_a_rotated_rectangle():
    rect = ((50.0, 40.0), (60.0, 20.0), 30.0)
    pts = cv2.boxPoints(rect)
    box, short = mini_box(pts)
    assert short == pytest.approx(20.0, abs=1e-3)
    assert box[0][0] == min(p[0] for p in box[:2]) and box.shape == (4, 2)
    # Corners go round: top-left, top-right, bottom-right, bottom-left (screen coords).
    (ax, ay), (bx, by) = box[1] - box[0], box[2] - box[1]
    assert ax * by - ay * bx > 0
    np.testing.assert_allclose(sorted(map(tuple, box)), sorted(map(tuple, pts)), atol=1e-3)


def test_unclip_grows_a_square_by_area_ratio_over_perimeter():
    sq = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=np.float32)
    grown = unclip(sq, 1.6)  # distance = 100 * 1.6 / 40 = 4
    assert grown.min(axis=0) == pytest.approx([-4, -4], abs=0.5)
    assert grown.max(axis=0) == pytest.approx([14, 14], abs=0.5)
    area = cv2.contourArea(grown.astype(np.float32))
    assert area == pytest.approx(100 + 4 * 10 * 4 + math.pi * 16, rel=0.02)  # rounded corners
    assert unclip(np.zeros((4, 2), np.float32), 1.6).shape == (0, 2)


def test_box_score_is_the_mean_inside_the_polygon():
    prob = np.zeros((40, 60), np.float32)
    prob[10:20, 10:40] = 0.8
    assert box_score(
        prob, np.array([[10, 10], [39, 10], [39, 19], [10, 19]], np.float32)
    ) == pytest.approx(0.8)
    assert box_score(prob, np.array([[45, 25], [55, 25], [55, 35], [45, 35]], np.float32)) == 0.0


def _box(x, y, w=30, h=10):
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


def test_reading_order_top_to_bottom_then_left_to_right():
    boxes = np.array(
        [
            _box(200, 52),  # line 2, right
            _box(10, 5),  # line 1, left
            _box(100, 50),  # line 2, left (2 px higher than its neighbour)
            _box(300, 8),  # line 1, right, 3 px lower
            _box(150, 2),  # line 1, middle, highest of all
        ],
        dtype=np.float32,
    )
    assert reading_order(boxes) == [1, 4, 3, 2, 0]
    assert reading_order(np.zeros((0, 4, 2), np.float32)) == []


def _meta(input_size, work_size, orig_size=None):
    orig = orig_size or work_size
    scale = (orig[0] / work_size[0], orig[1] / work_size[1])
    return DetMeta(
        orig_size=orig, work_size=work_size, input_size=input_size, scale=scale, pad_top=0
    )


def test_db_postprocess_finds_grows_scales_and_filters():
    prob = np.zeros((64, 128), np.float32)
    prob[20:30, 30:90] = 0.9  # a text kernel, 60 x 10
    prob[50:52, 5:7] = 0.9  # a speck: smaller than min_size
    prob[40:46, 100:120] = 0.4  # above thresh, under box_thresh
    meta = _meta((64, 128), (128, 256))  # work frame twice the map
    out = db_postprocess(prob, meta)
    assert len(out) == 1
    # Scored inside the dilated kernel's rectangle (61 x 11 pixels), as the reference.
    assert out.scores[0] == pytest.approx(0.9 * 60 * 10 / (61 * 11), abs=1e-3)
    # unclip distance = 600 * 1.6 / 140 = 6.9 map px around the dilated 61 x 11 kernel.
    x0, y0 = out.work_boxes[0].min(axis=0)
    x1, y1 = out.work_boxes[0].max(axis=0)
    assert 2 * 30 - 2 * 8 <= x0 <= 2 * 30 - 2 * 6
    assert 2 * 91 + 2 * 6 <= x1 <= 2 * 91 + 2 * 8
    assert 2 * 20 - 2 * 8 <= y0 <= 2 * 20 - 2 * 6
    np.testing.assert_array_equal(out.boxes, out.work_boxes)  # orig frame == work frame
    assert order_points_clockwise(out.boxes[0]).tolist() == out.boxes[0].tolist()


def test_db_postprocess_cuts_a_padded_batch_map():
    prob = np.zeros((64, 128), np.float32)
    prob[20:30, 30:90] = 0.9
    padded = np.zeros((1, 1, 96, 160), np.float32)
    padded[0, 0, :64, :128] = prob
    padded[0, 0, 70:90, 130:150] = 0.9  # text in the padding must not appear
    meta = _meta((64, 128), (64, 128))
    a, b = db_postprocess(prob, meta), db_postprocess(padded, meta)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def test_db_postprocess_of_nothing_is_empty():
    out = db_postprocess(np.zeros((1, 1, 32, 32), np.float32), _meta((32, 32), (32, 32)))
    assert len(out) == 0 and out.boxes.shape == (0, 4, 2)


# --- crops, classifier, recognizer input ----------------------------------------------


def test_axis_aligned_crop_is_the_slice():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    crop = crop_text_region(img, np.array(_box(10, 20, w=40, h=15), np.float32))
    assert crop.shape == (15, 40, 3)
    np.testing.assert_allclose(crop.astype(int), img[20:35, 10:50].astype(int), atol=1)


def test_tall_crop_is_turned_counter_clockwise():
    img = np.zeros((100, 100, 3), np.uint8)
    img[10:20, 40:50] = 255  # marks the top of a tall region
    crop = crop_text_region(img, np.array(_box(40, 10, w=10, h=60), np.float32))
    assert crop.shape == (10, 60, 3)  # 60 x 10 became 10 x 60
    assert crop[:, :10].mean() > 200 and crop[:, 20:].mean() < 10  # the top went left


def test_cls_turns_only_confident_upside_down_crops():
    crops = [np.full((10, 20, 3), i, np.uint8) for i in range(3)]  # ratio 2: 96 of 192
    crops[0][0, 0] = 255  # a marker to see the rotation
    probs = np.array([[0.05, 0.95], [0.9, 0.1], [0.15, 0.85]], np.float32)
    out, angles = cls_postprocess(probs, crops)
    assert out[0][-1, -1, 0] == 255 and crops[0][0, 0, 0] == 255  # input untouched
    assert out[1] is crops[1] and out[2] is crops[2]
    assert [a for a, _ in angles] == [180, 0, 180]
    tensor = cls_preprocess(crops)
    assert tensor.shape == (3, 3, 48, 192)
    assert (tensor[:, :, :, 96:] == 0).all()
    np.testing.assert_allclose(tensor[2, :, :, :96], (2 / 255 - 0.5) / 0.5, atol=1e-6)


def test_rec_preprocess_scales_to_48_and_pads_to_the_widest():
    narrow = np.full((24, 48, 3), (255, 0, 0), np.uint8)  # ratio 2, red
    wide = np.full((10, 100, 3), 128, np.uint8)  # ratio 10
    assert rec_width([narrow]) == 320  # never below min_width
    assert rec_width([narrow, wide]) == 480
    t = rec_preprocess([narrow, wide], RecConfig())
    assert t.shape == (2, 3, 48, 480) and t.dtype == np.float32
    assert (t[0, :, :, :96] == np.array([-1, -1, 1], np.float32)[:, None, None]).all()  # BGR
    assert (t[0, :, :, 96:] == 0).all()
    np.testing.assert_allclose(t[1], (128 / 255 - 0.5) / 0.5, atol=1e-6)


def test_batches_group_similar_widths():
    rng = np.random.default_rng(2)
    crops = [np.zeros((32, int(w), 3), np.uint8) for w in rng.integers(20, 600, 60)]
    batches = plan_batches(crops, 6)
    assert [len(b) for b in batches] == [6] * 10
    assert sorted(np.concatenate(batches).tolist()) == list(range(60))
    ratios = [c.shape[1] / c.shape[0] for c in crops]
    flat = [ratios[i] for b in batches for i in b]
    assert flat == sorted(flat)
    sorted_waste = np.mean([padding_fraction([crops[i] for i in b]) for b in batches])
    naive_waste = np.mean([padding_fraction(crops[i : i + 6]) for i in range(0, 60, 6)])
    assert sorted_waste < naive_waste / 2
    with pytest.raises(ValueError):
        plan_batches(crops, 0)


def test_configs_default_to_the_reference_config():
    """RapidOCR 1.4.4's config.yaml, read from the installed package."""
    import yaml

    from cvserve.models.ocr_files import package_dir

    ref = yaml.safe_load((package_dir() / "config.yaml").read_text())
    det, rec = DetConfig(), RecConfig()
    g, d, r, c = ref["Global"], ref["Det"], ref["Rec"], ref["Cls"]
    assert (det.max_side_len, det.min_side_len, det.min_height) == (
        g["max_side_len"],
        g["min_side_len"],
        g["min_height"],
    )
    assert det.width_height_ratio == g["width_height_ratio"]
    assert (det.limit_side_len, det.limit_type, det.thresh, det.box_thresh) == (
        d["limit_side_len"],
        d["limit_type"],
        d["thresh"],
        d["box_thresh"],
    )
    assert (det.max_candidates, det.unclip_ratio, det.use_dilation) == (
        d["max_candidates"],
        d["unclip_ratio"],
        d["use_dilation"],
    )
    assert d["score_mode"] == "fast" and d["mean"] == d["std"] == [0.5] * 3
    assert [3, rec.height, rec.min_width] == r["rec_img_shape"]
    assert rec.batch_size == r["rec_batch_num"] and rec.text_score == g["text_score"]
    assert rec.use_cls == g["use_cls"] is True
    assert [3, rec.cls_height, rec.cls_width] == c["cls_image_shape"]
    assert (rec.cls_batch_size, rec.cls_thresh) == (c["cls_batch_num"], c["cls_thresh"])
    assert c["label_list"] == ["0", "180"]
