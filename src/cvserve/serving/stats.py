"""Per-model request statistics in the shape of Triton's statistics extension (KServe v2
``/v2/models/{m}/stats``), plus cvserve's own stages under the same schema.

Triton's four durations are sums of cvserve stages: ``queue`` = queue + batch_wait,
``compute_input`` = decode + resize + normalize + h2d, ``compute_infer`` = infer,
``compute_output`` = postprocess + d2h + encode. Every stage is also reported by its own
name, so a dashboard reading Triton's fields and one reading cvserve's see the same time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from cvserve.trace import SERVER_STAGES

__all__ = ["TRITON_DURATIONS", "ModelStats"]

#: Triton's duration fields, as sums of cvserve stages.
TRITON_DURATIONS: dict[str, tuple[str, ...]] = {
    "queue": ("queue", "batch_wait"),
    "compute_input": ("decode", "resize", "normalize", "h2d"),
    "compute_infer": ("infer",),
    "compute_output": ("postprocess", "d2h", "encode"),
}


def _duration() -> dict[str, int]:
    return {"count": 0, "ns": 0}


class ModelStats:
    """Counts and nanosecond totals of one served model or pipeline (event-loop only)."""

    def __init__(self, name: str, version: str = "1") -> None:
        self.name = name
        self.version = version
        self.success = _duration()
        self.fail = _duration()
        self.durations = {k: _duration() for k in TRITON_DURATIONS}
        self.stages = {s: _duration() for s in SERVER_STAGES}
        self.inference_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, dict[str, int]] = {}

    def observe_batch(self, size: int, infer_s: float) -> None:
        """One model execution (a batch of ``size``) that took ``infer_s``."""
        b = self.batches.setdefault(size, _duration())
        b["count"] += 1
        b["ns"] += int(infer_s * 1e9)

    def record(self, stages: Mapping[str, float], ok: bool, inferences: int = 1) -> None:
        """One answered request: its stage times (seconds), whether it succeeded, and how
        many images it carried (Triton counts ``inference_count`` per image)."""
        total_ns = int(sum(stages.values()) * 1e9)
        bucket = self.success if ok else self.fail
        bucket["count"] += 1
        bucket["ns"] += total_ns
        if not ok:
            return
        self.inference_count += inferences
        self.last_inference_ms = int(time.time() * 1000)
        for field, parts in TRITON_DURATIONS.items():
            self.durations[field]["count"] += 1
            self.durations[field]["ns"] += int(sum(stages.get(s, 0.0) for s in parts) * 1e9)
        for name, seconds in stages.items():
            if name in self.stages:
                self.stages[name]["count"] += 1
                self.stages[name]["ns"] += int(seconds * 1e9)

    def to_triton(self) -> dict[str, Any]:
        """Triton's ``model_stats`` entry (JSON field names of its HTTP statistics API)."""
        inference = {"success": dict(self.success), "fail": dict(self.fail)}
        inference.update({k: dict(v) for k, v in self.durations.items()})
        inference.update({f"cvserve_{k}": dict(v) for k, v in self.stages.items() if v["count"]})
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": sum(b["count"] for b in self.batches.values()),
            "inference_stats": inference,
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_infer": dict(b),
                }
                for size, b in sorted(self.batches.items())
            ],
        }
