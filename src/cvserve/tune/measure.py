"""Measuring one candidate: a real server with its settings, a closed-loop concurrency sweep.

The sweep doubles the concurrency (1, 2, 4 ... ``max_concurrency``) and stops at the first
point that misses the SLO (p99 above it, or any request not answered 2xx) or whose
throughput did not rise by more than ``rise`` over the best so far (the server is
saturated: more concurrency only adds queueing). When it stopped on a miss (so the
throughput was still rising), one more point halfway between the last point that met the
SLO and the miss is measured. The candidate's score is the highest throughput of the
points that met the SLO; none: the candidate misses it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvserve.tune.search import Measurement, Settings

log = logging.getLogger(__name__)

#: Throughput must rise by more than this fraction for the sweep to go on.
RISE = 0.03

PointFn = Callable[[int], dict[str, Any]]


def concurrency_ladder(max_concurrency: int) -> list[int]:
    out, c = [], 1
    while c < max_concurrency:
        out.append(c)
        c *= 2
    return [*out, max_concurrency]


def sweep(
    point: PointFn, slo_p99_ms: float, max_concurrency: int, rise: float = RISE
) -> Measurement:
    """Run ``point(concurrency)`` up the ladder (see the module docstring); ``point``
    returns at least ``throughput_rps``, ``p99_ms`` (None: nothing answered) and
    ``errors``."""
    points: list[dict[str, Any]] = []

    def measure(c: int) -> dict[str, Any]:
        p = dict(point(c), concurrency=c)
        p["meets_slo"] = bool(
            not p.get("errors") and p.get("p99_ms") is not None and p["p99_ms"] <= slo_p99_ms
            and p.get("throughput_rps", 0) > 0
        )  # fmt: skip
        points.append(p)
        return p

    last_ok: dict[str, Any] | None = None
    for c in concurrency_ladder(max_concurrency):
        p = measure(c)
        if not p["meets_slo"]:
            if last_ok is not None and c - last_ok["concurrency"] > 1:
                measure((c + last_ok["concurrency"]) // 2)
            break
        top = max((q["throughput_rps"] for q in points[:-1] if q["meets_slo"]), default=0.0)
        rising = p["throughput_rps"] > top * (1.0 + rise)
        last_ok = p
        if not rising:
            break
    ok = [p for p in points if p["meets_slo"]]
    if not ok:
        return Measurement(points=points)
    best = max(ok, key=lambda p: p["throughput_rps"])
    return Measurement(points=points, throughput_rps=best["throughput_rps"],
                       p99_ms=best["p99_ms"], concurrency=best["concurrency"])  # fmt: skip


def _point_dict(p: Any) -> dict[str, Any]:
    """The parts of a bench PointSummary a tuner keeps."""
    return {
        "throughput_rps": p.throughput_rps,
        "p50_ms": p.latency_ms.get("p50"),
        "p99_ms": p.latency_ms.get("p99"),
        "requests": p.requests,
        "errors": p.errors["total"],
        "by_status": p.errors["by_status"],
        "mean_batch_size": p.mean_batch_size,
    }


class ServerMeasurer:
    """``measure(settings)``: start ``cvserve serve --config`` with ``settings`` (the very
    YAML a winner would be written as), sweep it with cvserve's bench, stop it."""

    def __init__(
        self,
        model: str,
        images: Sequence[Any],
        slo_p99_ms: float,
        *,
        cache_dir: str | None = None,
        point_s: float = 5.0,
        warmup_s: float = 1.0,
        max_concurrency: int = 64,
        start_timeout_s: float = 300.0,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.model = model
        self.images = list(images)
        self.slo_p99_ms = slo_p99_ms
        self.cache_dir = cache_dir
        self.point_s = point_s
        self.warmup_s = warmup_s
        self.max_concurrency = max_concurrency
        self.start_timeout_s = start_timeout_s
        self.progress = progress or (lambda e: None)
        # a request slower than this is an error, and misses any sane SLO many times over
        self.timeout_s = max(30.0, 10 * slo_p99_ms / 1000.0)

    def __call__(self, settings: Settings) -> Measurement:
        from cvserve.bench import BenchConfig, BenchError, run_bench
        from cvserve.serving.process import ServerProcess
        from cvserve.tune.output import write_config

        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="cvserve-tune-") as tmp:
            path = write_config(Path(tmp) / "serve.yaml", self.model, settings, self.cache_dir)
            server = ServerProcess(["--config", str(path)])
            try:
                server.start(timeout=self.start_timeout_s)
            except (RuntimeError, TimeoutError, OSError) as e:
                server.stop()
                last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
                return Measurement(error=f"server did not start: {last[0]}",
                                   wall_s=time.monotonic() - t0)  # fmt: skip

            def point(c: int) -> dict[str, Any]:
                self.progress({"event": "point", "concurrency": c})
                res = run_bench(BenchConfig(
                    url=server.url, model=self.model, images=self.images, concurrency=[c],
                    duration=self.point_s, warmup=self.warmup_s, timeout=self.timeout_s,
                ), command=[])  # fmt: skip
                p = _point_dict(res.points[0])
                self.progress({"event": "point_done", "concurrency": c, **p})
                return p

            try:
                m = sweep(point, self.slo_p99_ms, self.max_concurrency)
            except BenchError as e:
                m = Measurement(error=f"bench failed: {e}")
            finally:
                server.stop()
        m.wall_s = time.monotonic() - t0
        return m
