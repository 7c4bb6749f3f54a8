"""``run_tune``: load the images, search (``tune.search``) with real measurements
(``tune.measure``), keep every candidate in the state file, write the winner's YAML."""

from __future__ import annotations

import logging
import os
import platform
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvserve.tune.output import header_lines, table_rows, write_config
from cvserve.tune.search import DECODERS, Measure, Search, SearchResult
from cvserve.tune.state import TuneState, images_digest, state_path

if TYPE_CHECKING:
    from cvserve.bench.point import OnProgress

log = logging.getLogger(__name__)


class TuneError(RuntimeError):
    """A tuning run that cannot start (no images, a model that does not build ...)."""


@dataclass(frozen=True)
class TuneConfig:
    model: str
    images: str | Path
    slo_p99_ms: float
    out: str | Path
    budget_s: float = 1800.0
    fresh: bool = False
    cache_dir: str | None = None
    #: Seconds measured per concurrency point, after ``warmup_s``.
    point_s: float = 5.0
    warmup_s: float = 1.0
    max_concurrency: int = 64
    min_gain: float = 0.03
    #: Cores the candidates may use (default: those this process may run on).
    cores: int | None = None
    command: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.slo_p99_ms > 0:
            raise ValueError("the SLO (p99 ms) must be > 0")
        if not self.budget_s > 0:
            raise ValueError("the budget must be > 0 seconds")
        if not self.point_s > 0 or self.warmup_s < 0:
            raise ValueError("point seconds must be > 0, warm-up >= 0")
        if self.max_concurrency < 1:
            raise ValueError("max concurrency must be >= 1")


@dataclass
class TuneReport:
    result: SearchResult
    rows: list[dict[str, Any]]
    #: The YAML written (None: no candidate met the SLO, nothing written).
    config_path: Path | None
    state_path: Path
    elapsed_s: float


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_decoders() -> tuple[str, ...]:
    """The search's decoders whose library imports here."""
    out = []
    for d in DECODERS:
        mod = {"simplejpeg": "simplejpeg", "opencv": "cv2"}.get(d)
        if mod is not None:
            try:
                __import__(mod)
            except ImportError:
                continue
        out.append(d)
    return tuple(out)


def run_tune(
    config: TuneConfig,
    progress: OnProgress | None = None,
    measure: Measure | None = None,
    clock: Callable[[], float] | None = None,
) -> TuneReport:
    """Search for the best settings of ``config.model`` (see ``cvserve.tune.search``);
    ``measure`` replaces the real server measurement (tests)."""
    import time

    from cvserve.bench import ImageSourceError, load_images
    from cvserve.machine import machine_info

    clock = clock or time.monotonic
    t0 = clock()
    progress = progress or (lambda e: None)
    try:
        images = load_images(config.images)
    except ImageSourceError as e:
        raise TuneError(str(e)) from None
    cores = config.cores or usable_cores()
    key = {
        "model": config.model, "images": images_digest(images), "n_images": len(images),
        "slo_p99_ms": float(config.slo_p99_ms), "point_s": float(config.point_s),
        "warmup_s": float(config.warmup_s), "max_concurrency": config.max_concurrency,
        "cores": cores,
    }  # fmt: skip
    spath = state_path(config.out)
    state = TuneState(spath, fresh=config.fresh)
    known = state.known(key)
    if measure is None:
        from cvserve.models import store
        from cvserve.tune.measure import ServerMeasurer

        # built before the clock counts candidates: a build is not a candidate's time
        store.ensure_built(config.model, config.cache_dir,
                           progress=lambda m: progress({"event": "message", "message": m}))  # fmt: skip
        measure = ServerMeasurer(
            config.model, images, config.slo_p99_ms, cache_dir=config.cache_dir,
            point_s=config.point_s, warmup_s=config.warmup_s,
            max_concurrency=config.max_concurrency, progress=progress,
        )  # fmt: skip
    search = Search(
        measure, cores, config.budget_s - (clock() - t0), known=known,
        decoders=available_decoders(), min_gain=config.min_gain,
        on_candidate=lambda c: state.add(key, c), progress=progress, clock=clock,
    )  # fmt: skip
    result = search.run()
    rows = table_rows(result)
    machine = machine_info()
    info = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cores": cores,
        "cpu": machine.get("cpu_model") or platform.processor() or "unknown CPU",
        "version": machine["versions"].get("cvserve"), "images": str(config.images),
        "n_images": len(images), "point_s": config.point_s, "warmup_s": config.warmup_s,
        "max_concurrency": config.max_concurrency, "state": spath.name,
        "command": shlex.join(config.command) if config.command else "cvserve tune",
    }  # fmt: skip
    config_path = None
    if result.winner is not None:
        config_path = write_config(
            config.out, config.model, result.winner.settings, config.cache_dir,
            header=header_lines(config.model, result, config.slo_p99_ms, info),
        )  # fmt: skip
    elapsed = clock() - t0
    state.finish({
        "key": key, "info": info, "stop_reason": result.stop_reason, "elapsed_s": elapsed,
        "budget_s": config.budget_s, "winner": rows[result.candidates.index(result.winner)]
        if result.winner else None, "default": rows[0], "table": rows,
        "config": str(config_path) if config_path else None,
    })  # fmt: skip
    return TuneReport(result, rows, config_path, spath, elapsed)
