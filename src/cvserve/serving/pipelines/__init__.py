"""Multi-DNN pipelines: stage A in the serving process fans each image out into items,
stage B workers (in-process or ``cvserve worker`` processes) serve them through a broker,
and results are joined back to their request."""

from __future__ import annotations

from cvserve.serving.pipelines.base import FanOut, PipelineKind, StageOptions

__all__ = ["KINDS", "FanOut", "PipelineKind", "StageOptions", "get_kind"]

KINDS = ("ocr", "detect-classify")


def get_kind(kind: str) -> PipelineKind:
    """The pipeline definition for ``kind``."""
    if kind == "ocr":
        from cvserve.serving.pipelines.ocr import OcrPipeline

        return OcrPipeline()
    if kind == "detect-classify":
        from cvserve.serving.pipelines.detect_classify import DetectClassifyPipeline

        return DetectClassifyPipeline()
    raise ValueError(f"unknown pipeline kind {kind!r}; known: {', '.join(KINDS)}")
