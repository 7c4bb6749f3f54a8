"""Fixtures for the OCR tests: the pipeline, RapidOCR as the reference, the images.

Everything here needs the ``ocr`` extra (opencv-python, pyclipper and the
rapidocr-onnxruntime wheel that ships the PP-OCRv4 models); without it the tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OCR needs the ocr extra (opencv-python)")
pytest.importorskip("pyclipper", reason="OCR needs the ocr extra (pyclipper)")
pytest.importorskip("rapidocr_onnxruntime", reason="OCR models come with the ocr extra")


@pytest.fixture(scope="session")
def ocr_pipeline():
    from cvserve.serving.pipelines.ocr import load_ocr_models
    from cvserve.tasks.ocr import OcrReference

    return OcrReference(load_ocr_models())


@pytest.fixture(scope="session")
def rapid_ocr():
    """The package's own end-to-end OCR with its default config (angle classifier on)."""
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR()


def _data_dir() -> Path:
    # As the suite's root conftest (data_dir fixture), needed here at collection time.
    env = os.environ.get("CVSERVE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def ocr_files() -> list[str]:
    """Every image of the OCR set, as MANIFEST.tsv lists it (relative paths)."""
    manifest = _data_dir() / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    rows = manifest.read_text().splitlines()[1:]
    return sorted(r.split("\t")[0] for r in rows if r.startswith("ocr/"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ocr_file" in metafunc.fixturenames:
        metafunc.parametrize("ocr_file", ocr_files())


@pytest.fixture(scope="session")
def load_rgb():
    """Bytes -> upright RGB pixels through cvserve's own decoder (EXIF applied)."""
    from cvserve.images.decode import decode

    def load(path: Path) -> np.ndarray:
        return np.asarray(decode(path.read_bytes()).image)

    return load
