"""The task-head protocol and the registry of heads by task name."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, ClassVar, Protocol

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``, in ``x``'s own dtype."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


class TaskHead(Protocol):
    """Turns one request's rows of the model outputs into a JSON-able result.

    A head declares the request parameters ``postprocess`` takes (``params``) and whether
    its post-processing and the encoding of its result take real CPU (``heavy``: they run
    on a pool thread, not on the event loop)."""

    task: str
    params: ClassVar[tuple[Param, ...]]
    heavy: ClassVar[bool]

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **params: Any) -> dict: ...


def get_head(model: ModelMeta) -> TaskHead:
    """The head of ``model.task``: a new task is one new module ``cvserve.tasks.<task>``
    whose ``HEAD`` is its TaskHead class."""
    task = model.task
    head = None
    if task.isidentifier() and importlib.util.find_spec(f"cvserve.tasks.{task}") is not None:
        head = getattr(importlib.import_module(f"cvserve.tasks.{task}"), "HEAD", None)
    if head is None:
        raise ValueError(
            f"model {model.name!r} has task {task!r}, and no module cvserve.tasks.{task} "
            "defines its HEAD (classify, segment, detect, depth and embed do)"
        )
    return head(model)
