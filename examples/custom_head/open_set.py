"""A head of your own for cvserve: an open-set classifier.

A plain classifier always names one of its classes, even for a photo of something it was
never trained on. This head answers ``"unknown"`` unless the best class's probability,
after temperature scaling (a calibration fitted offline), reaches ``min_confidence``; it
lists the ``top_k`` alternatives either way. It also looks at the whole photo (a direct
resize) instead of the model's centre crop.

Serve it with any classifier in the store::

    PYTHONPATH=examples/custom_head:$PYTHONPATH python -m cvserve serve --model tiny-resnet \
        --head open_set:OpenSetClassifier

cvserve imports this module at start-up, checks the class against
``cvserve.tasks.base.TaskHead`` and gives it decoding, batching, admission, stage timing
(``Server-Timing``) and every front door (/v1, /v2 HTTP, v2 gRPC's ``result`` output).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param


class OpenSetClassifier:
    #: the answer's "task" (any name; it need not be one of cvserve's)
    task = "open_set"
    #: request parameters (/v1 query string, v2 request parameters), checked by cvserve:
    #: a bad value is a 400 naming the parameter before the model runs
    params = (
        Param("min_confidence", float, 0.5, 0.0, 1.0, help="answer 'unknown' below this"),
        Param("temperature", float, 1.0, 0.01, 100.0, help="softmax temperature"),
        Param("top_k", int, 3, 1, 20, help="alternatives listed"),
    )
    #: a softmax over 1000 numbers is cheap: run on the event loop, not a pool thread
    heavy = False
    #: optional: changes to the model's preprocessing spec (cvserve.images.spec)
    preprocess = {"resize_mode": "direct"}

    def __init__(self, model: ModelMeta) -> None:
        self.labels = list(model.labels)

    def postprocess(
        self,
        outputs: list[np.ndarray],
        meta: ImageMeta,
        min_confidence: float = 0.5,
        temperature: float = 1.0,
        top_k: int = 3,
        **_: Any,
    ) -> dict:
        logits = np.asarray(outputs[0], dtype=np.float64).reshape(-1) / temperature
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")[:top_k]
        best = int(order[0])
        known = bool(p[best] >= min_confidence)
        return {
            "label": self._label(best) if known else "unknown",
            "known": known,
            "confidence": float(p[best]),
            "alternatives": [{"label": self._label(int(i)), "p": float(p[i])} for i in order],
            "image": {"width": meta.orig_size[0], "height": meta.orig_size[1]},
        }

    def _label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else f"class_{i}"
