"""Embeddings: a model whose output row is one vector (a face or re-identification
network) answers ``{"embedding": [floats], "dim": N}``.

A minimal head, enough for pipelines' ``gallery`` step; the ``embed`` task's full head
(normalization, pooling choices) is another change's, which replaces this module.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param


class EmbedHead:
    task = "embed"
    params: ClassVar[tuple[Param, ...]] = ()
    heavy: ClassVar[bool] = False

    def __init__(self, model: ModelMeta) -> None:
        self.model = model

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **_: Any) -> dict:
        v = np.asarray(outputs[0], dtype=np.float64).reshape(-1)
        return {"embedding": [float(x) for x in v], "dim": int(v.size)}


HEAD = EmbedHead
