"""The packaged PP-OCR models behind the ``ocr_det`` and ``ocr_rec`` ops (the ``ocr``
preset, ``config/presets/ocr.yaml``).

``ocr_det``: ``tasks.ocr.detect`` (DB detector, boxes, one crop per text region: the
fan-out). ``ocr_rec``: ``tasks.ocr.recognize`` over crops from any requests (angle
classifier, recognizer batched by aspect ratio, CTC). Join: ``tasks.ocr.join_lines``. The steps live in ``cvserve.tasks.ocr``; this module is their
runtime wiring: it opens the onnxruntime sessions and charges the steps' stage times.

``cvserve.tasks.ocr`` needs the ``ocr`` extra (opencv, pyclipper), so it is imported
where it is used: this module itself imports without the extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cvserve.brokers import Message
from cvserve.runtime import OrtOptions, open_runtime
from cvserve.serving.pipelines.base import (
    BATCH,
    INFER_S,
    POST_S,
    StageOptions,
    open_stage_model,
    waited_for_cores,
)

if TYPE_CHECKING:
    from cvserve.models.ocr_files import OcrModelFiles
    from cvserve.tasks.ocr import Infer, OcrConfig, OcrModels

KIND = "ocr"


def open_session(path: str | Path, options: OrtOptions | None = None) -> Infer:
    """An onnxruntime session on ``path`` as the steps' ``Infer``: batch -> first output."""
    runtime = open_runtime(path, options=options)
    return lambda batch: runtime.run(batch)[0]


def load_ocr_models(cfg: OcrConfig | None = None, options: OrtOptions | None = None) -> OcrModels:
    """Sessions on the packaged PP-OCR models for ``tasks.ocr.OcrReference``, the
    reference that runs both stages in one process."""
    from cvserve.models.ocr_files import ocr_model_files
    from cvserve.tasks.ocr import OcrConfig, OcrModels

    files = ocr_model_files()
    rec, labels, cls = _open_recognizer(
        files, cfg or OcrConfig(), lambda path, _: open_session(path, options)
    )
    return OcrModels(det=open_session(files.det, options), rec=rec, labels=labels, cls=cls)


def _open_recognizer(
    files: OcrModelFiles, cfg: OcrConfig, open_infer: Callable[[Path, str], Infer]
) -> tuple[Infer, list[str], Infer | None]:
    """Stage B's models, opened by ``open_infer(path, stage)``: recognizer, its CTC
    classes, and the angle classifier when ``cfg.rec.use_cls`` (None otherwise)."""
    from cvserve.models.ocr_files import read_dictionary
    from cvserve.tasks.ocr import ctc_labels

    rec = open_infer(files.rec, "rec")
    cls = open_infer(files.cls, "cls") if cfg.rec.use_cls else None
    return rec, ctc_labels(read_dictionary(files.rec)), cls


def _stage_infer(path: str | Path, options: StageOptions, stage: str) -> Infer:
    runtime = open_stage_model(path, options, stage)
    return lambda batch: runtime.run(batch)[0]


def _ocr_config(options: StageOptions) -> OcrConfig:
    from dataclasses import replace

    from cvserve.tasks.ocr import OcrConfig

    cfg = OcrConfig()
    if "use_cls" in options.params:
        cfg = replace(cfg, rec=replace(cfg.rec, use_cls=bool(options.params["use_cls"])))
    return cfg


class OcrDetStage:
    """The detector of ``op: ocr_det`` (``steps.OcrDetOp`` runs it on an image)."""

    def __init__(self, options: StageOptions) -> None:
        from cvserve.models.ocr_files import ocr_model_files

        self.cfg = _ocr_config(options)
        self.options = options
        self.max_pixels = options.max_pixels
        self.det = _stage_infer(ocr_model_files().det, options, "det")


class OcrRecStage:
    """Stage B: crops from any requests in, (text, score) per crop out."""

    def __init__(self, options: StageOptions) -> None:
        from cvserve.models.ocr_files import ocr_model_files

        self.options = options
        self.cfg = _ocr_config(options)
        self.rec, self.labels, self.cls = _open_recognizer(
            ocr_model_files(),
            self.cfg,
            lambda path, stage: _stage_infer(path, options, stage),
        )

    def run(self, messages: list[Message]) -> list[Message]:
        from cvserve.tasks.ocr import recognize

        waited_for_cores(self.options)  # forget what a call that raised on this thread left
        crops = [m.arrays["crop"] for m in messages]
        read = recognize(crops, self.rec, self.labels, self.cfg.rec, self.cls)
        # The result headers carry two numbers: inference, and all the rest of the step.
        # Time waiting for a core is neither: the server counts it in the broker hop, with
        # the rest of the time the items waited for this stage.
        infer = read.stages.get("infer", 0.0)
        post = sum(read.stages.values()) - infer
        infer -= waited_for_cores(self.options)
        n = len(messages)
        return [
            m.reply(
                headers={
                    "text": text,
                    "score": float(score),
                    INFER_S: infer,
                    POST_S: post,
                    BATCH: n,
                }
            )  # fmt: skip
            for m, (text, score) in zip(messages, read.texts, strict=True)
        ]
