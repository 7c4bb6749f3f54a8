"""Classification head: softmax over the logits, top-k labels and scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.base import softmax
from cvserve.tasks.params import Param

DEFAULT_TOP_K = 5


class ClassifyHead:
    task = "classify"
    params = (Param("top_k", int, DEFAULT_TOP_K, 1, 1000, help="labels to return"),)
    #: softmax and top-k take microseconds: not worth a thread hop
    heavy = False

    def __init__(self, model: ModelMeta) -> None:
        self.labels = list(model.labels)

    def postprocess(
        self, outputs: list[np.ndarray], meta: ImageMeta, top_k: int = DEFAULT_TOP_K, **_: Any
    ) -> dict:
        probs = softmax(np.asarray(outputs[0], dtype=np.float64).reshape(-1))
        k = max(1, min(int(top_k), probs.size))
        idx = np.argpartition(-probs, k - 1)[:k]
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        return {
            "top_k": [
                {"index": int(i), "label": self._label(int(i)), "score": float(probs[i])}
                for i in idx
            ]
        }

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"


HEAD = ClassifyHead
