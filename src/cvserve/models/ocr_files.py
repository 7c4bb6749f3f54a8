"""Locate the PP-OCRv4 ONNX files and the recognition dictionary that the
``rapidocr-onnxruntime`` wheel ships, without importing that package.

The wheel is only the weights provider: cvserve's own code (``cvserve.tasks.ocr``) does
every pre- and post-processing step. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "rapidocr_onnxruntime"
DISTRIBUTION = "rapidocr-onnxruntime"
#: The wheel version whose files (and defaults in its config.yaml) cvserve matches.
TESTED_VERSION = "1.4.4"

DET_FILE = "models/ch_PP-OCRv4_det_infer.onnx"
REC_FILE = "models/ch_PP-OCRv4_rec_infer.onnx"
CLS_FILE = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
#: ONNX metadata key under which PP-OCR exports store the recognition dictionary.
CHARACTER_KEY = "character"


class OcrModelsNotFound(FileNotFoundError):
    """The OCR model files are not installed (install cvserve's ``ocr`` extra)."""


@dataclass(frozen=True)
class OcrModelFiles:
    """Paths of the three packaged PP-OCR models."""

    det: Path  # DB text detector, input x: [N, 3, H, W] (H, W multiples of 32)
    rec: Path  # CRNN/SVTR recognizer, input x: [N, 3, 48, W], output [N, W/8, 6625]
    cls: Path  # text-direction (0/180 degree) classifier, input x: [N, 3, 48, 192]
    version: str  # the wheel's version


def package_dir() -> Path:
    """The installed package folder. ``find_spec`` locates it without running its
    ``__init__`` (which imports cv2, yaml and builds nothing we need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OcrModelsNotFound(
            f"the OCR models come from the {DISTRIBUTION}=={TESTED_VERSION} wheel, which is "
            "not installed; install cvserve's 'ocr' extra"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def ocr_model_files() -> OcrModelFiles:
    """The packaged det/rec/cls ONNX files; raises ``OcrModelsNotFound`` if any is missing."""
    root = package_dir()
    files = {
        name: root / rel for name, rel in (("det", DET_FILE), ("rec", REC_FILE), ("cls", CLS_FILE))
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise OcrModelsNotFound(f"OCR model files missing from {root}: {', '.join(missing)}")
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return OcrModelFiles(version=version, **files)


def read_dictionary(path: str | Path) -> list[str]:
    """The recognizer's characters, in class order (without CTC blank and space).

    ``path`` is either a dictionary text file (one character per line, PaddleOCR's
    ``ppocr_keys_v1.txt`` format) or a recognition ONNX file carrying the dictionary in its
    ``character`` metadata, as the packaged PP-OCRv4 model does.
    """
    path = Path(path)
    if path.suffix.lower() == ".txt":
        # Split on "\n" only, as the reference's binary readlines() does.
        lines = path.read_bytes().decode("utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [line.strip("\r\n") for line in lines]
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Only the metadata is wanted: skip graph optimization (about 70 ms for the rec model).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if CHARACTER_KEY not in meta:
        raise ValueError(f"{path}: no {CHARACTER_KEY!r} metadata; pass the dictionary .txt file")
    # splitlines() as the reference does, so the class indices line up exactly.
    return meta[CHARACTER_KEY].splitlines()
