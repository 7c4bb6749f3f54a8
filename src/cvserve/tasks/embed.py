"""Image embedding head: one vector per image, L2-normalised (image search, face or
re-identification, CLIP / DINOv2 features).

The model's first output is one vector per image (``(D,)``, or ``(1, D)``); a
``(T, D)`` token sequence takes its first (CLS) token. The answer is
``{"embedding": [D floats], "dim": D}`` with ``||embedding|| = 1`` (a zero vector stays
zero), so the dot product of two answers is their cosine similarity. ``normalize=false``
returns the model's raw vector. As npz the vector is the float32 array ``embedding``; the
KServe v2 door answers it as the FP32 output ``embedding`` [N, D].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.encode import as_json_list
from cvserve.tasks.params import Param


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """``v / ||v||`` in float32 (computed in float64); a zero vector stays zero."""
    v64 = np.asarray(v, dtype=np.float64).reshape(-1)
    norm = float(np.sqrt(np.dot(v64, v64)))
    return (v64 / norm if norm > 0 else v64).astype(np.float32)


def vector_of(output: np.ndarray) -> np.ndarray:
    """One image's row of the model output as a 1-D vector."""
    row = np.asarray(output)
    if row.ndim == 2:  # (1, D) or a (T, D) token sequence: the first (CLS) token
        row = row[0]
    if row.ndim != 1:
        raise ValueError(f"an embedding model's output row must be (D,), got {row.shape}")
    return row


class EmbedHead:
    task = "embed"
    params = (
        Param("normalize", bool, True, help="L2-normalise the vector (false: the raw output)"),
    )
    #: one small vector: microseconds
    heavy = False

    def __init__(self, model: ModelMeta) -> None:
        self.model = model

    def postprocess(
        self, outputs: list[np.ndarray], meta: ImageMeta, normalize: bool = True, **_: Any
    ) -> dict:
        v = vector_of(outputs[0])
        vec = l2_normalize(v) if normalize else np.asarray(v, dtype=np.float32)
        return {"embedding": as_json_list(vec), "dim": int(vec.size)}


HEAD = EmbedHead
