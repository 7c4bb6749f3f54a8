"""The OCR pipeline end to end: no text, hundreds of lines, the stage descriptions, and
the shared steps (``detect``, ``recognize``) with stand-in DNN calls."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cvserve.models.ocr_files import ocr_model_files
from cvserve.serving.pipelines.ocr import load_ocr_models, open_session
from cvserve.tasks.ocr import (
    OcrConfig,
    OcrReference,
    RecConfig,
    ctc_labels,
    describe_stages,
    detect,
    padding_fraction,
    plan_batches,
    recognize,
)
from cvserve.trace import SERVER_STAGES

WORDS = (
    "apple river stone cloud green house light paper table chair water music night bread "
    "horse plant train sugar smile dream north south storm field glass brick candle forest "
    "garden hammer island jacket kettle lemon mirror orange pencil rocket silver tiger "
    "velvet window yellow zebra anchor basket copper dollar"
).split()
ROWS, COLS, X0, Y0, DX, DY = 25, 8, 20, 36, 185, 42


@pytest.fixture(scope="module")
def word_grid() -> tuple[np.ndarray, dict[tuple[int, int], str]]:
    """A 1500 x 1100 page with 200 short words in a grid, and the word of each cell."""
    rng = np.random.default_rng(0)
    img = np.full((1100, 1500, 3), 255, np.uint8)
    cells = {}
    for r in range(ROWS):
        for c in range(COLS):
            word = WORDS[int(rng.integers(len(WORDS)))] + str(int(rng.integers(10, 100)))
            org = (X0 + c * DX, Y0 + r * DY)
            cv2.putText(img, word, org, cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
            cells[(r, c)] = word
    return img, cells


def _cell(box: np.ndarray) -> tuple[int, int]:
    cx, cy = box.mean(axis=0)
    return int((cy - Y0 + DY - 12) // DY), int((cx - X0) // DX)


def test_blank_image_has_no_lines(ocr_pipeline):
    assert ocr_pipeline(np.full((300, 400, 3), 255, np.uint8)) == []
    assert ocr_pipeline(np.zeros((1, 1, 3), np.uint8)) == []  # tiny: size guards, no crash


def test_photo_without_text_has_no_lines(data_dir, load_rgb, ocr_pipeline):
    result = ocr_pipeline.run(load_rgb(data_dir / "images/small/giraffe.jpg"))
    assert result.lines == [] and result.detected.crops == []
    assert result.recognized is None  # zero crops: stage B never runs


def test_hundreds_of_lines_are_read_in_batches(word_grid, ocr_pipeline):
    img, cells = word_grid
    result = ocr_pipeline.run(img)
    lines = result.lines
    assert len(lines) == len(cells) == 200
    read = {_cell(line.box): line.text for line in lines}
    assert sum(read.get(k) == w for k, w in cells.items()) >= 0.97 * len(cells)
    # Reading order: row by row, left to right.
    assert [_cell(line.box) for line in lines] == sorted(cells)
    # The recognizer ran in full batches of 6, not once per crop.
    assert result.recognized.batches == math.ceil(200 / RecConfig().batch_size)
    for stages in (result.detected.stages, result.recognized.stages):
        assert set(stages) == {"resize", "infer", "postprocess"} <= set(SERVER_STAGES)


def test_grouping_by_width_wastes_little_padding(word_grid):
    img, _ = word_grid
    crops = detect(img, open_session(ocr_model_files().det), OcrConfig().det).crops
    assert len(crops) == 200  # fan-out: one image -> one crop per box
    batches = plan_batches(crops, 32)
    waste = np.mean([padding_fraction([crops[i] for i in b]) for b in batches])
    naive = np.mean([padding_fraction(crops[i : i + 32]) for i in range(0, 200, 32)])
    assert waste < naive and waste < 0.6  # short words are padded up to min_width 320


def test_bigger_batches_read_the_same(word_grid):
    """Batch composition changes only the padding: a server batching 50 crops (across
    requests, say) must read what batches of 6 read."""
    img, cells = word_grid
    cfg = OcrConfig(rec=RecConfig(batch_size=50, use_cls=False))
    result = OcrReference(load_ocr_models(cfg), cfg).run(img)
    assert result.recognized.batches == 4
    read = {_cell(line.box): line.text for line in result.lines}
    assert sum(read.get(k) == w for k, w in cells.items()) >= 0.97 * len(cells)


def test_lines_serialize_to_json(data_dir, load_rgb, ocr_pipeline):
    lines = ocr_pipeline(load_rgb(data_dir / "ocr/ger_1.jpg"))
    assert lines[0].text == "EPPING"
    doc = json.loads(json.dumps([line.to_dict() for line in lines]))
    assert doc[0]["text"] == "EPPING" and len(doc[0]["box"]) == 4


def test_stage_descriptions_match_the_models():
    files = ocr_model_files()
    stages = describe_stages(files)
    assert list(stages) == ["det", "cls", "rec"]  # the reference default runs cls
    no_cls = OcrConfig(rec=RecConfig(use_cls=False))
    assert list(describe_stages(files, no_cls)) == ["det", "rec"]
    for spec in stages.values():
        assert spec.onnx_file.is_file()
        session = ort.InferenceSession(str(spec.onnx_file), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.name == spec.input_name and inp.type == "tensor(float)"
        fixed = [d if isinstance(d, int) else None for d in inp.shape]
        for want, have in zip(spec.input_shape[1:], fixed[1:], strict=True):
            assert have is None or want == have
    assert stages["det"].unit == "image" and stages["det"].recommended_batch == 1
    assert stages["rec"].unit == "crop" and stages["rec"].input_shape[2] == 48


def test_angle_classifier_reads_upside_down_text(data_dir, load_rgb, ocr_pipeline):
    rgb = load_rgb(data_dir / "ocr/ger_1.jpg")
    upside_down = np.ascontiguousarray(rgb[::-1, ::-1])
    texts = [line.text for line in ocr_pipeline(upside_down)]
    assert texts == ["Eppingen,Germany", "Twinned with", "EPPING"]  # reading order of boxes
    cfg = OcrConfig(rec=RecConfig(use_cls=False))
    no_cls = OcrReference(load_ocr_models(cfg), cfg)
    assert "EPPING" not in [line.text for line in no_cls(upside_down)]


# --- the shared steps with stand-in DNN calls ---------------------------------------------


def _pixel(x: float) -> int:
    """Invert the recognizer/classifier normalization (x/255 - 0.5)/0.5."""
    return int(round((x * 0.5 + 0.5) * 255))


def test_detect_maps_the_probability_map_back_to_the_image():
    """A stand-in detector marks one rectangle: one box where it lies in the original
    image (the input was scaled up for the detector), one crop of its size."""
    rgb = np.full((320, 640, 3), 255, np.uint8)
    seen = []

    def det(x: np.ndarray) -> np.ndarray:
        seen.append(x.shape)
        prob = np.zeros((1, 1, *x.shape[2:]), np.float32)
        h, w = x.shape[2:]
        prob[0, 0, int(0.25 * h) : int(0.35 * h), int(0.1 * w) : int(0.6 * w)] = 1.0
        return prob

    found = detect(rgb, det, OcrConfig().det)
    assert seen == [(1, 3, 736, 1472)]  # shorter side up to 736, multiples of 32
    assert len(found.boxes) == len(found.crops) == 1
    cx, cy = found.boxes.boxes[0].mean(axis=0)
    assert abs(cx - 0.35 * 640) < 4 and abs(cy - 0.30 * 320) < 4
    # The 320 x 32 rectangle grown by the same unclip margin on every side.
    ch, cw = found.crops[0].shape[:2]
    assert ch > 32 and abs((cw - ch) - (320 - 32)) <= 4
    assert set(found.stages) == {"resize", "infer", "postprocess"}
    nothing = detect(rgb, lambda x: np.zeros((1, 1, *x.shape[2:]), np.float32), OcrConfig().det)
    assert len(nothing.boxes) == 0 and nothing.crops == []


def test_recognize_keeps_crop_order_across_batches_and_turns_crops_upright():
    """Crops of random widths are batched by aspect ratio (for the classifier and the
    recognizer each); results must still come back in input order. Each crop's left half
    has value 10 + i, its right half 200 + i; the stand-in recognizer reads the top-left
    pixel, so a crop the stand-in classifier called upside down reads 200 + i."""
    rng = np.random.default_rng(3)
    crops = []
    for i, w in enumerate(rng.integers(20, 400, 13)):
        crop = np.full((32, int(w), 3), 10 + i, np.uint8)
        crop[:, int(w) // 2 :] = 200 + i
        crops.append(crop)
    before = [c.copy() for c in crops]
    upside_down = {10 + i for i in range(0, 13, 3)}
    labels = ctc_labels([str(v) for v in range(256)])
    rec_batches = []

    def cls(x: np.ndarray) -> np.ndarray:
        flip = [_pixel(row[0, 0, 0]) in upside_down for row in x]
        return np.array([[0.0, 1.0] if f else [1.0, 0.0] for f in flip], np.float32)

    def rec(x: np.ndarray) -> np.ndarray:
        rec_batches.append(len(x))
        out = np.zeros((len(x), 1, len(labels)), np.float32)
        out[np.arange(len(x)), 0, [_pixel(row[0, 0, 0]) + 1 for row in x]] = 1.0
        return out

    cfg = RecConfig()
    read = recognize(crops, rec, labels, cfg, cls)
    want = [str(200 + i if 10 + i in upside_down else 10 + i) for i in range(13)]
    assert [t for t, _ in read.texts] == want
    assert [s for _, s in read.texts] == [1.0] * 13
    assert read.batches == len(rec_batches) == 3 and rec_batches == [6, 6, 1]
    assert all((a == b).all() for a, b in zip(crops, before, strict=True))  # not changed
    assert set(read.stages) == {"resize", "infer", "postprocess"}
    with pytest.raises(ValueError, match="angle classifier"):
        recognize(crops, rec, labels, cfg)  # use_cls without a classifier
