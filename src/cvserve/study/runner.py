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
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cvserve.bench.point import OnProgress
from cvserve.study.context import (
    StudyConfig,
    StudyContext,
    StudyError,
    default_images_root,
)
from cvserve.study.experiments import EXPERIMENT_DEFS, Experiment
from cvserve.study.plan import SIZES, ServerSpec, StudyPoint, settings_for
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

#: Seconds a server process takes to start, for the ETA.
_START_S = 4.0


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
            names += [s["model"] for s in p.get("steps") or [] if "model" in s]
    return names


# --- measuring a point ---------------------------------------------------------------------
def _bench_point(ctx: StudyContext, url: str, plan: StudyPoint) -> dict[str, Any]:
    from cvserve.bench import BenchConfig, run_bench

    s = ctx.settings
    config = BenchConfig(
        url=url,
        model=plan.target,
        kind=plan.kind,
        images=ctx.images(plan.images),
        concurrency=[plan.concurrency],
        duration=s.duration,
        warmup=s.warmup,
        timeout=60.0,
    )
    result = run_bench(config)
    p = result.points[0]
    if p.ok == 0 and not p.errors["total"]:
        # The window closed before the first answer (a slow point on a busy machine, e.g.
        # the baseline on large photos in --quick): measure by count instead, so the point
        # says what a request costs rather than "nothing succeeded".
        log.info("%s: no answer within %.1f s; measuring %d requests", plan.id,
                 s.duration, plan.concurrency)  # fmt: skip
        config = replace(config, duration=None, requests=plan.concurrency, max_duration=60.0)
        result = run_bench(config)
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
    if plan.server is not None and plan.server.kind not in ("cvserve", "baseline"):
        _unreported(metrics)
    return metrics


#: What a peer server's client-side remainder is called: latency minus the stages the
#: peer reports. Its framework's own hops (Ray Serve's proxy to its replica ...) are in it,
#: not only the network, so calling it ``network`` would blame the wire for them.
UNREPORTED = "unreported"


def _unreported(metrics: dict[str, Any]) -> None:
    for key in ("breakdown_ms", "breakdown_pct"):
        part = metrics.get(key) or {}
        if "network" in part:
            part[UNREPORTED] = part.pop("network")


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


def run_study(config: StudyConfig, progress: OnProgress | None = None) -> list[ExperimentResult]:
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
    if config.images is not None and not all((Path(images_root) / s).is_dir() for s in SIZES):
        raise StudyError(
            f"no photos in {config.images}: --images needs small/, medium/ and large/ "
            "folders (the shared data set has them at ../shared/data/images)"
        )
    if images_root is None:  # an installed cvserve, anywhere: the demo's synthetic photos
        from cvserve.bench.inputs import write_synthetic_photos

        images_root = write_synthetic_photos(config.out / "photos")
        (progress or (lambda e: None))({"event": "message", "message": (
            f"no photos found (../shared/data/images, $CVSERVE_DATA): using synthetic "
            f"small, medium and large JPEGs written to {images_root}; no OCR images, so "
            "the broker experiment runs detect-classify only"
        )})  # fmt: skip
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
