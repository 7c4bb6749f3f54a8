"""The task-head protocol and the registry of heads by task name."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``, in ``x``'s own dtype."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


class TaskHead(Protocol):
    """Turns one request's rows of the model outputs into a JSON-able result."""

    task: str

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **params: Any) -> dict: ...


def get_head(model: ModelMeta) -> TaskHead:
    from cvserve.tasks.classify import ClassifyHead
    from cvserve.tasks.depth import DepthHead
    from cvserve.tasks.detect import DetectHead
    from cvserve.tasks.segment import SegmentHead

    heads = {
        "classify": ClassifyHead,
        "segment": SegmentHead,
        "detect": DetectHead,
        "depth": DepthHead,
    }
    try:
        return heads[model.task](model)
    except KeyError:
        raise ValueError(
            f"model {model.name!r} has task {model.task!r}; supported: {', '.join(heads)}"
        ) from None
