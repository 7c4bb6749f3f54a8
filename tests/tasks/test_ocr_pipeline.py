"""The OCR pipeline end to end: no text, hundreds of lines, the stage descriptions."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from cvserve.tasks.ocr import (
    OcrConfig,
    OcrPipeline,
    RecConfig,
    crop_text_regions,
    db_postprocess,
    describe_stages,
    det_preprocess,
    ocr_image,
    padding_fraction,
    plan_batches,
)

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
    timings: dict[str, list[float]] = {}
    assert ocr_pipeline(load_rgb(data_dir / "images/small/giraffe.jpg"), timings) == []
    assert "rec_infer" not in timings  # zero crops: stage B never runs


def test_hundreds_of_lines_are_read_in_batches(word_grid, ocr_pipeline):
    img, cells = word_grid
    timings: dict[str, list[float]] = {}
    lines = ocr_pipeline(img, timings)
    assert len(lines) == len(cells) == 200
    read = {_cell(line.box): line.text for line in lines}
    assert sum(read.get(k) == w for k, w in cells.items()) >= 0.97 * len(cells)
    # Reading order: row by row, left to right.
    assert [_cell(line.box) for line in lines] == sorted(cells)
    # The recognizer ran in full batches of 6, not once per crop.
    assert len(timings["rec_infer"]) == math.ceil(200 / RecConfig().batch_size)


def test_grouping_by_width_wastes_little_padding(word_grid):
    img, _ = word_grid
    det = det_preprocess(img)
    session = ort.InferenceSession(
        str(describe_stages()["det"].onnx_file), providers=["CPUExecutionProvider"]
    )
    boxes = db_postprocess(session.run(None, {"x": det.tensor[None]})[0], det.meta)
    crops = crop_text_regions(det.image, boxes.work_boxes)
    assert len(crops) == 200  # fan-out: one image -> one crop per box
    batches = plan_batches(crops, 32)
    waste = np.mean([padding_fraction([crops[i] for i in b]) for b in batches])
    naive = np.mean([padding_fraction(crops[i : i + 32]) for i in range(0, 200, 32)])
    assert waste < naive and waste < 0.6  # short words are padded up to min_width 320


def test_bigger_batches_read_the_same(word_grid):
    """Batch composition changes only the padding: a server batching 50 crops (across
    requests, say) must read what batches of 6 read."""
    img, cells = word_grid
    pipe = OcrPipeline(cfg=OcrConfig(rec=RecConfig(batch_size=50, use_cls=False)))
    timings: dict[str, list[float]] = {}
    lines = pipe(img, timings)
    assert len(timings["rec_infer"]) == 4
    read = {_cell(line.box): line.text for line in lines}
    assert sum(read.get(k) == w for k, w in cells.items()) >= 0.97 * len(cells)


def test_ocr_image_convenience_and_json(data_dir, load_rgb):
    lines = ocr_image(load_rgb(data_dir / "ocr/ger_1.jpg"))
    assert lines[0].text == "EPPING"
    doc = json.loads(json.dumps([line.to_dict() for line in lines]))
    assert doc[0]["text"] == "EPPING" and len(doc[0]["box"]) == 4


def test_stage_descriptions_match_the_models():
    stages = describe_stages()
    assert list(stages) == ["det", "cls", "rec"]  # the reference default runs cls
    assert list(describe_stages(cfg=OcrConfig(rec=RecConfig(use_cls=False)))) == ["det", "rec"]
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
    no_cls = OcrPipeline(cfg=OcrConfig(rec=RecConfig(use_cls=False)))
    assert "EPPING" not in [line.text for line in no_cls(upside_down)]
