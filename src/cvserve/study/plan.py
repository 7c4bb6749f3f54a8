"""What a study runs: its size (:class:`StudySettings`, one per profile), the servers it
needs (:class:`ServerSpec`) and its load points (:class:`StudyPoint`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT",
    "QUICK",
    "SIZES",
    "ServerSpec",
    "StudyPoint",
    "StudySettings",
    "settings_for",
]

#: The image size classes, each a folder under the images root.
SIZES = ("small", "medium", "large")


# --- settings per profile -----------------------------------------------------------------
@dataclass(frozen=True)
class StudySettings:
    """How big a study is: models, loads and time per point."""

    profile: str
    model: str  # the classifier of setups / concurrency / image-sizes / accelerator
    models: tuple[str, ...]  # the models experiment
    concurrency: int  # fixed concurrency of setups / image-sizes
    models_concurrency: int
    sweep: tuple[int, ...]  # the concurrency experiment
    duration: float
    warmup: float
    profile_batches: tuple[int, ...]  # batch sizes of the DNN-alone measurement
    profile_repeats: int
    fanouts: tuple[int, ...]  # detect-classify objects per image
    broker_concurrency: int
    detector: str
    classifier: str
    speedups: tuple[int, ...]
    accel_concurrency: int
    accel_max_batch: int
    cpu_cost_seconds: float  # CPU time spent measuring preprocessing cost per size class


QUICK = StudySettings(
    profile="quick",
    model="tiny-resnet",
    models=("tiny-resnet", "tiny-vit", "tiny-segformer", "tiny-rtdetr", "tiny-depth"),
    concurrency=8,
    models_concurrency=4,
    sweep=(1, 4, 16, 64),
    duration=1.5,
    warmup=0.5,
    profile_batches=(1, 4, 8),
    profile_repeats=3,
    fanouts=(1, 32),
    broker_concurrency=2,
    detector="tiny-yolos",
    classifier="tiny-resnet",
    speedups=(1, 10, 100),
    accel_concurrency=16,
    accel_max_batch=16,
    cpu_cost_seconds=0.3,
)
DEFAULT = StudySettings(
    profile="default",
    model="resnet50",
    models=(
        "resnet18",
        "resnet50",
        "mobilenet-v2",
        "vit-base",
        "segformer-b0",
        "rtdetr-r18",
        "yolos-tiny",
        "depth-anything-small",
    ),  # fmt: skip
    concurrency=16,
    models_concurrency=8,
    sweep=(1, 2, 4, 8, 16, 32, 64),
    duration=8.0,
    warmup=2.0,
    profile_batches=(1, 2, 4, 8, 16),
    profile_repeats=5,
    fanouts=(1, 4, 8, 16, 32),
    broker_concurrency=4,
    detector="yolos-tiny",
    classifier="resnet18",
    speedups=(1, 10, 100),
    accel_concurrency=32,
    accel_max_batch=16,
    cpu_cost_seconds=3.0,
)


def settings_for(
    profile: str, model: str | None = None, duration: float | None = None
) -> StudySettings:
    from dataclasses import replace

    base = {"quick": QUICK, "default": DEFAULT}[profile]
    changes: dict[str, Any] = {}
    if model:
        changes["model"] = model
    if duration:
        changes["duration"] = duration
    return replace(base, **changes) if changes else base


# --- plans ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    """A server some points need. Points with equal ``key`` share one process.

    ``kind``: ``cvserve`` (``args`` for ``cvserve serve``, or ``config``: a YAML document
    whose ``{redis}`` and ``{out}`` placeholders the runner fills in), ``baseline`` or a peer
    (``litserve``, ``ray-serve``) serving ``model``.
    """

    key: str
    kind: str = "cvserve"
    args: tuple[str, ...] = ()
    config: str | None = None
    model: str | None = None
    needs_redis: bool = False


@dataclass
class StudyPoint:
    """One load point of an experiment: what to send, to which server, how hard."""

    id: str
    labels: dict[str, Any]
    server: ServerSpec | None
    target: str = ""
    kind: str = "model"  # "model" | "pipeline"
    images: str = "medium"  # a folder under the images root, or "ocr"
    concurrency: int = 1
    skip: str | None = None  # run nothing, record this reason
    simulated: bool = False
