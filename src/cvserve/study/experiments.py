"""The paper's experiments as data: what each varies, which servers it needs, and how its
numbers turn into derived values and finding sentences.

Each experiment is an :class:`Experiment`: ``prepare`` measures what is not served (the
DNN alone, the CPU cost of preprocessing), ``plans`` lists the load points, each with the
server it needs (points that share a server run back to back on one process), ``metrics``
adds experiment-specific numbers to a point, and ``finish`` computes ``derived`` and the
findings. The runner (``study/runner.py``) does the serving, measuring and saving.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvserve.study.results import ExperimentResult, Finding

if TYPE_CHECKING:
    from cvserve.study.runner import StudyContext

__all__ = [
    "EXPERIMENT_DEFS",
    "Experiment",
    "PointPlan",
    "ServerSpec",
    "Settings",
    "fmt_number",
    "settings_for",
]

_PRE = ("decode", "resize", "normalize")
_QUEUE = ("queue", "batch_wait")


# --- settings per profile -----------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
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


QUICK = Settings(
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
DEFAULT = Settings(
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


def settings_for(profile: str, model: str | None = None, duration: float | None = None) -> Settings:
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
class PointPlan:
    id: str
    labels: dict[str, Any]
    server: ServerSpec | None
    target: str = ""
    kind: str = "model"  # "model" | "pipeline"
    images: str = "medium"  # a folder under the images root, or "ocr"
    concurrency: int = 1
    skip: str | None = None  # run nothing, record this reason
    simulated: bool = False


@dataclass
class Experiment:
    name: str
    title: str
    paper: dict[str, str]
    plans: Callable[[StudyContext, ExperimentResult], list[PointPlan]]
    finish: Callable[[StudyContext, ExperimentResult], None]
    prepare: Callable[[StudyContext, ExperimentResult], None] | None = None
    metrics: Callable[[PointPlan, dict[str, Any], StudyContext, ExperimentResult], None] | None = (
        None
    )
    params: Callable[[Settings], dict[str, Any]] = field(default=lambda s: {})


# --- shared arithmetic --------------------------------------------------------------------
def _g(value: float, digits: int = 1) -> float:
    """Round for a sentence; the finding stores exactly what the sentence prints."""
    return round(float(value), digits)


def _finding(
    fid: str, template: str, words: dict[str, str] | None = None, **values: float
) -> Finding:
    """A sentence from ``template``: ``values`` (numbers, printed with ``:g`` and stored in
    the finding, so each printed number can be checked against the JSON) and ``words``."""
    text = template.format(**(words or {}), **{k: fmt_number(v) for k, v in values.items()})
    return Finding(fid, text, dict(values))


def fmt_number(value: float) -> str:
    """How a finding prints a number: as rounded, thousands separated past 9,999."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:g}"


def _sum(bd: dict[str, float], stages: tuple[str, ...]) -> float:
    return sum(bd.get(s, 0.0) for s in stages)


def share(metrics: dict[str, Any], stages: tuple[str, ...]) -> float:
    """Percent of mean latency spent in ``stages``."""
    mean = metrics.get("mean_ms") or 0.0
    return 100.0 * _sum(metrics.get("breakdown_ms", {}), stages) / mean if mean else 0.0


#: The study measures queueing as the paper did: requests wait instead of being refused
#: for the time they are expected to wait (cvserve's default refuses those with a 429).
QUEUE_ALL = ("--max-queue-wait-ms", "0")


def _model_server(key: str, model: str, *extra: str) -> ServerSpec:
    return ServerSpec(key=key, args=("--model", model, *QUEUE_ALL, *extra))


# --- 1. setups (paper Fig. 3) -----------------------------------------------------------------
_SETUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (id, display name, cvserve serve flags); "baseline" and peers are their own servers
    ("full-size-decode", "full-size decode", ("--decoder", "pil")),
    ("no-batching", "no batching", ("--max-batch", "1")),
    ("2-instances", "2 instances", ("--instances", "2", "--intra-op-threads", "1")),
    ("cvserve", "cvserve", ()),
)


def _setups_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    s = ctx.settings
    c = s.concurrency
    plans = [
        PointPlan(
            id="baseline",
            labels={"setup": "baseline", "model": s.model, "concurrency": c},
            server=ServerSpec(key="setups-baseline", kind="baseline", model=s.model),
            target=s.model,
            concurrency=c,
        )
    ]
    for sid, name, flags in _SETUPS:
        plans.append(
            PointPlan(
                id=sid,
                labels={"setup": name, "model": s.model, "concurrency": c},
                server=_model_server(f"setups-{sid}", s.model, *flags),
                target=s.model,
                concurrency=c,
            )
        )
    for peer, reason in ctx.peers().items():
        plans.append(
            PointPlan(
                id=peer,
                labels={"setup": peer.replace("-", " "), "model": s.model, "concurrency": c},
                server=None
                if reason
                else ServerSpec(key=f"setups-{peer}", kind=peer, model=s.model),
                target=s.model,
                concurrency=c,
                skip=reason,
            )
        )
    return plans


def _setups_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    thr = {p.id: p.metrics["throughput_rps"] for p in result.ok_points()}
    base = thr.get("baseline")
    result.derived["x_baseline"] = (
        {p.labels["setup"]: _g(thr[p.id] / base, 2) for p in result.ok_points()} if base else {}
    )
    full = result.point("cvserve")
    if not base or full is None or full.status != "ok":
        return
    model, c = full.labels["model"], full.labels["concurrency"]
    x = _g(thr["cvserve"] / base, 2)
    f = _finding(
        "setups-speedup",
        "At concurrency {c}, cvserve serves {model} at {thr} req/s, {x}x the {base} req/s of "
        "the plain baseline server (full decode, PIL resize, batch 1).",
        {"model": model}, c=c, thr=_g(thr["cvserve"]), x=x, base=_g(base),
    )  # fmt: skip
    result.findings.append(f)
    costs = {}
    for sid, name in (("full-size-decode", "full-size decoding"), ("no-batching", "no batching")):
        if sid in thr:
            costs[sid] = (name, _g(100.0 * (1.0 - thr[sid] / thr["cvserve"]), 0))
    if costs:
        keys = {sid: sid.replace("-", "_") for sid in costs}
        parts = [
            f"{name} costs {{{keys[sid]}}}% of its throughput" for sid, (name, _) in costs.items()
        ]
        result.findings.append(
            _finding(
                "setups-ablation",
                "Against full cvserve, " + " and ".join(parts) + ".",
                **{keys[sid]: v for sid, (_, v) in costs.items()},
            )
        )


# --- 2. models (Fig. 4) ---------------------------------------------------------------------
def _models_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    s = ctx.settings
    args: list[str] = []
    for m in s.models:
        args += ["--model", m]
    server = ServerSpec(key="models", args=(*args, *QUEUE_ALL))
    return [
        PointPlan(
            id=m,
            labels={"model": m, "task": ctx.task_of(m)},
            server=server,
            target=m,
            concurrency=s.models_concurrency,
        )
        for m in s.models
    ]


def _models_metrics(plan, metrics, ctx, result) -> None:
    metrics["infer_share_pct"] = _g(share(metrics, ("infer",)), 2)


def _models_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    pts = result.ok_points()
    if not pts:
        return
    shares = sorted(pts, key=lambda p: p.metrics["infer_share_pct"])
    lo, hi = shares[0], shares[-1]
    f = _finding(
        "models-infer-share",
        "Inference is {lo}% to {hi}% of end-to-end latency across {n} models at concurrency "
        "{c}: the rest is preprocessing, queueing, post-processing and encoding.",
        lo=_g(lo.metrics["infer_share_pct"], 0), hi=_g(hi.metrics["infer_share_pct"], 0),
        n=len(pts), c=ctx.settings.models_concurrency,
    )  # fmt: skip
    result.findings.append(f)
    result.findings.append(
        _finding(
            "models-lowest",
            "The smallest inference share is {name}'s ({task}): {pct}%.",
            {"name": lo.labels["model"], "task": lo.labels["task"]},
            pct=_g(lo.metrics["infer_share_pct"], 0),
        )
    )


# --- 3. concurrency (Fig. 5) ------------------------------------------------------------------
def _concurrency_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    s = ctx.settings
    server = _model_server("concurrency", s.model)
    return [
        PointPlan(
            id=f"c{c}",
            labels={"model": s.model, "concurrency": c},
            server=server,
            target=s.model,
            concurrency=c,
        )
        for c in s.sweep
    ]


def _concurrency_metrics(plan, metrics, ctx, result) -> None:
    metrics["queue_ms"] = _g(_sum(metrics.get("breakdown_ms", {}), _QUEUE), 3)
    metrics["queue_share_pct"] = _g(share(metrics, _QUEUE), 2)


def _concurrency_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    pts = sorted(result.ok_points(), key=lambda p: p.labels["concurrency"])
    if len(pts) < 2:
        return
    peak = max(p.metrics["throughput_rps"] for p in pts)
    # saturation: the first concurrency within 10% of the peak throughput
    sat = next(p for p in pts if p.metrics["throughput_rps"] >= 0.9 * peak)
    last = pts[-1]
    result.derived["saturation_concurrency"] = sat.labels["concurrency"]
    result.derived["peak_rps"] = _g(peak)
    result.findings.append(
        _finding(
            "concurrency-saturation",
            "Throughput reaches 90% of its peak ({peak} req/s) at {c} concurrent requests; "
            "at {cmax}, {q}% of a request's {lat} ms is queueing (queue + batch_wait).",
            peak=_g(peak),
            c=sat.labels["concurrency"],
            cmax=last.labels["concurrency"],
            q=_g(last.metrics["queue_share_pct"], 0),
            lat=_g(last.metrics["mean_ms"], 0),
        )  # fmt: skip
    )


# --- 4. image sizes -------------------------------------------------------------------------
SIZES = ("small", "medium", "large")


def _sizes_prepare(ctx: StudyContext, result: ExperimentResult) -> None:
    alone = ctx.dnn_alone(ctx.settings.model)
    result.derived["dnn_alone_rps"] = alone["rps"]
    result.derived["dnn_alone_batch"] = alone["batch"]
    result.derived["dnn_alone_profile"] = alone["latency_ms"]


def _sizes_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    """Each size at concurrency 1 (where the latency goes) and under load (throughput)."""
    s = ctx.settings
    plans = []
    for server_name, spec in (
        ("cvserve", _model_server("sizes-cvserve", s.model)),
        ("baseline", ServerSpec(key="sizes-baseline", kind="baseline", model=s.model)),
    ):
        for size in SIZES:
            for c, suffix in ((1, "-c1"), (s.concurrency, "")):
                plans.append(
                    PointPlan(
                        id=f"{server_name}-{size}{suffix}",
                        labels={
                            "model": s.model,
                            "size": size,
                            "server": server_name,
                            "concurrency": c,
                        },  # fmt: skip
                        server=spec,
                        target=s.model,
                        images=size,
                        concurrency=c,
                    )
                )
    return plans


def _sizes_metrics(plan, metrics, ctx, result) -> None:
    bd = metrics.get("breakdown_ms", {})
    metrics["preprocess_ms"] = _g(_sum(bd, _PRE), 3)
    metrics["preprocess_share_pct"] = _g(share(metrics, _PRE), 2)
    alone = result.derived.get("dnn_alone_rps")
    if alone and plan.concurrency > 1:  # at c=1 throughput is bound by latency, not lost
        metrics["throughput_lost_pct"] = _g(100.0 * (1.0 - metrics["throughput_rps"] / alone), 2)


def _sizes_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    c = ctx.settings.concurrency
    for size in ("large", "medium"):
        cv1 = result.ok_points(server="cvserve", size=size, concurrency=1)
        bl1 = result.ok_points(server="baseline", size=size, concurrency=1)
        cv = result.ok_points(server="cvserve", size=size, concurrency=c)
        bl = result.ok_points(server="baseline", size=size, concurrency=c)
        if not (cv1 and bl1 and cv and bl):
            continue
        result.findings.append(
            _finding(
                f"sizes-{size}",
                "On {size} photos, one request at a time, preprocessing (decode + resize + "
                "normalize) is {pre}% of cvserve's latency and {pre_b}% of the baseline's; "
                "at concurrency {c} cvserve serves {thr} req/s against {alone} for the DNN "
                "alone, {lost}% of the DNN's throughput lost ({lost_b}% for the baseline). "
                "The paper reports up to 56% of latency on a medium image and ~80% of "
                "throughput lost on a large one.",
                {"size": size},
                pre=_g(cv1[0].metrics["preprocess_share_pct"], 0),
                pre_b=_g(bl1[0].metrics["preprocess_share_pct"], 0),
                c=c,
                thr=_g(cv[0].metrics["throughput_rps"]),
                alone=_g(result.derived.get("dnn_alone_rps", 0.0)),
                lost=_g(cv[0].metrics.get("throughput_lost_pct", 0.0), 0),
                lost_b=_g(bl[0].metrics.get("throughput_lost_pct", 0.0), 0),
            )
        )


# --- 5. broker ------------------------------------------------------------------------------
_OCR_SKIP = "the OCR pipeline needs the ocr extra (pip install 'cvserve[ocr]')"


def _broker_config(ctx: StudyContext, broker: str) -> str:
    s = ctx.settings
    lines = [
        "server:",
        f'  broker: "{"{redis}" if broker == "redis" else "inprocess://"}"',
        "pipelines:",
    ]
    if ctx.has_ocr():
        lines.append("  - {name: ocr, kind: ocr, stage_workers: 1}")
    for n in s.fanouts:
        lines.append(
            f"  - {{name: dc-{n}, kind: detect-classify, stage_workers: 1, max_batch_size: 32, "
            f"params: {{objects: {n}, detector: {s.detector}, classifier: {s.classifier}}}}}"
        )
    return "\n".join(lines) + "\n"


def _broker_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    s = ctx.settings
    c = s.broker_concurrency
    plans = []
    for broker in ("inprocess", "redis"):
        reason = None if broker == "inprocess" else ctx.redis_unavailable()
        server = (
            None
            if reason
            else ServerSpec(
                key=f"broker-{broker}",
                config=_broker_config(ctx, broker),
                needs_redis=broker == "redis",
            )
        )
        plans.append(
            PointPlan(
                id=f"ocr-{broker}",
                labels={"pipeline": "ocr", "broker": broker, "fanout": None, "concurrency": c},
                server=server,
                target="ocr",
                kind="pipeline",
                images="ocr",
                concurrency=c,
                skip=reason or (None if ctx.has_ocr() else _OCR_SKIP),
            )
        )
        for n in s.fanouts:
            plans.append(
                PointPlan(
                    id=f"dc{n}-{broker}",
                    labels={
                        "pipeline": "detect-classify",
                        "broker": broker,
                        "fanout": n,
                        "concurrency": c,
                    },  # fmt: skip
                    server=server,
                    target=f"dc-{n}",
                    kind="pipeline",
                    images="medium",
                    concurrency=c,
                    skip=reason,
                )
            )
    return plans


def _broker_metrics(plan, metrics, ctx, result) -> None:
    metrics["broker_ms"] = _g(metrics.get("breakdown_ms", {}).get("broker", 0.0), 3)
    metrics["broker_share_pct"] = _g(share(metrics, ("broker",)), 2)
    n = plan.labels.get("fanout")
    metrics["items_per_s"] = _g(metrics["throughput_rps"] * n, 2) if n else None


def _broker_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    dc = [p for p in result.ok_points(pipeline="detect-classify")]
    if not dc:
        return
    # Stage B's capacity: the most crops per second it ever classified in this run.
    cap = max(p.metrics["items_per_s"] or 0.0 for p in dc)
    result.derived["stage_b_items_per_s"] = _g(cap, 2)
    for broker in ("inprocess", "redis"):
        pts = sorted(result.ok_points(pipeline="detect-classify", broker=broker),
                     key=lambda p: p.labels["fanout"])  # fmt: skip
        if len(pts) < 2:
            continue
        lo, hi = pts[0], pts[-1]
        f = _finding(
            f"broker-fanout-{broker}",
            "Over the {b} broker, going from {n0} to {n1} objects per image takes the "
            "broker's share of latency (publish to consume, including the queue in front of "
            "the classifier) from {s0}% to {s1}% and throughput from {t0} to {t1} req/s.",
            {"b": broker}, n0=lo.labels["fanout"], n1=hi.labels["fanout"],
            s0=_g(lo.metrics["broker_share_pct"], 0), s1=_g(hi.metrics["broker_share_pct"], 0),
            t0=_g(lo.metrics["throughput_rps"], 2), t1=_g(hi.metrics["throughput_rps"], 2),
        )  # fmt: skip
        result.findings.append(f)
    pairs = []
    for n in ctx.settings.fanouts:
        a = result.ok_points(pipeline="detect-classify", broker="inprocess", fanout=n)
        b = result.ok_points(pipeline="detect-classify", broker="redis", fanout=n)
        if a and b:
            pairs.append(b[0].metrics["broker_ms"] - a[0].metrics["broker_ms"])
    if pairs:
        result.findings.append(
            _finding(
                "broker-redis-cost",
                "Redis Streams instead of the in-process broker adds {d} ms of broker time per "
                "request (median over {n} fan-outs); the classifier stage peaked at {cap} crops/s, "
                "so fan-outs past that rate queue in front of it whatever the broker.",
                d=_g(statistics.median(pairs), 1),
                n=len(pairs),
                cap=_g(cap, 1),
            )  # fmt: skip
        )


# --- 6. accelerator ---------------------------------------------------------------------------
def _accel_prepare(ctx: StudyContext, result: ExperimentResult) -> None:
    s = ctx.settings
    profiles: dict[str, dict[str, Any]] = {}
    old = result.derived.get("profiles", {})  # from a resumed run: the same files
    for k in s.speedups:
        name = f"{k}x"
        if name in old and Path(old[name]["file"]).exists():
            profiles[name] = old[name]
            continue
        path = ctx.write_profile(s.model, ctx.dnn_alone(s.model), k, name)
        profiles[name] = {
            "file": str(path),
            "speedup": k,
            "latency_ms": ctx.profile_latencies(path),
        }
    for given in ctx.extra_profiles:
        name = Path(given).stem if Path(given).exists() else given
        profiles[name] = {
            "file": given,
            "speedup": None,
            "latency_ms": ctx.profile_latencies(given),
        }
    for p in profiles.values():
        p["inference_alone_rps"] = _g(ctx.inference_alone_rps(p["file"], s.accel_max_batch), 2)
    result.derived["profiles"] = profiles
    if "cpu_ms_per_image" not in result.derived:
        result.derived["cpu_ms_per_image"] = ctx.cpu_cost_per_image(s.model)


def _accel_plans(ctx: StudyContext, result: ExperimentResult) -> list[PointPlan]:
    s = ctx.settings
    profiles = result.derived.get("profiles", {})
    models = "\n".join(
        f"  - {{name: {s.model}-{name}, model: {s.model}, runtime: simulated, "
        f'sim_profile: "{p["file"]}", max_batch_size: {s.accel_max_batch}, max_queue: 512, '
        f"max_queue_wait_ms: 0}}"
        for name, p in profiles.items()
    )
    server = ServerSpec(key="accelerator", config=f"models:\n{models}\n")
    return [
        PointPlan(
            id=f"{name}-{size}",
            labels={
                "model": s.model,
                "speedup": name,
                "size": size,
                "concurrency": s.accel_concurrency,
            },
            server=server,
            target=f"{s.model}-{name}",
            images=size,
            concurrency=s.accel_concurrency,
            simulated=True,
        )
        for name in profiles
        for size in SIZES
    ]


def _accel_metrics(plan, metrics, ctx, result) -> None:
    p = result.derived["profiles"][plan.labels["speedup"]]
    metrics["inference_alone_rps"] = p["inference_alone_rps"]
    metrics["e2e_vs_inference_pct"] = _g(
        100.0 * metrics["throughput_rps"] / p["inference_alone_rps"], 2
    )
    metrics["preprocess_share_pct"] = _g(share(metrics, _PRE), 2)


def _accel_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    cost = result.derived.get("cpu_ms_per_image", {})
    # cores = images/s x CPU seconds per image; per 1,000 images/s that is the CPU ms/image
    result.derived["cores_per_1000_rps"] = {
        size: {who: _g(ms, 2) for who, ms in c.items()} for size, c in cost.items()
    }
    result.derived["cores_needed"] = {
        name: {
            size: {who: _g(p["inference_alone_rps"] * ms / 1000.0, 2) for who, ms in c.items()}
            for size, c in cost.items()
        }
        for name, p in result.derived.get("profiles", {}).items()
    }
    for k in sorted(ctx.settings.speedups):
        pts = {size: result.ok_points(speedup=f"{k}x", size=size) for size in SIZES}
        if k == 1 or not all(pts.values()):
            continue
        result.findings.append(
            _finding(
                f"accelerator-{k}x",
                "With an accelerator {k}x faster than this CPU, end to end reaches {s}% of "
                "what the accelerator alone sustains on small photos, {m}% on medium and "
                "{l}% on large ones: the host's decoding and resizing, not the DNN, set the "
                "throughput.",
                k=k,
                s=_g(pts["small"][0].metrics["e2e_vs_inference_pct"], 0),
                m=_g(pts["medium"][0].metrics["e2e_vs_inference_pct"], 0),
                l=_g(pts["large"][0].metrics["e2e_vs_inference_pct"], 0),
            )
        )
    top = max(ctx.settings.speedups)
    for size in ("medium", "large"):
        pts = result.ok_points(speedup=f"{top}x", size=size)
        c = cost.get(size)
        if not pts or not c:
            continue
        m = pts[0].metrics
        f = _finding(
            f"accelerator-{size}",
            "With an accelerator {k}x faster than this CPU, {size} photos are served end to "
            "end at {thr} req/s, {pct}% of the {alone} images/s the accelerator alone "
            "sustains; preprocessing needs {cv} host cores per 1,000 images/s with cvserve "
            "against {bl} with the baseline's (so {need} cores to feed this accelerator).",
            {"size": size}, k=top, thr=_g(m["throughput_rps"]), pct=_g(m["e2e_vs_inference_pct"], 0),
            alone=_g(m["inference_alone_rps"], 0), cv=_g(c["cvserve"], 1),
            bl=_g(c["baseline"], 1),
            need=_g(result.derived["cores_needed"][f"{top}x"][size]["cvserve"], 1),
        )  # fmt: skip
        result.findings.append(f)


# --- the registry -----------------------------------------------------------------------------
EXPERIMENT_DEFS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "setups",
            "Serving setups: one model, served several ways",
            {
                "figure": "Fig. 3",
                "claim": "An optimized Triton setup (GPU preprocessing with DALI, dynamic batching, "
                "several instances) reached 2.25x the throughput of prior work on the same "
                "model.",
            },  # fmt: skip
            plans=_setups_plans,
            finish=_setups_finish,
            params=lambda s: {"model": s.model, "concurrency": s.concurrency},
        ),
        Experiment(
            "models",
            "Models and tasks: how much of the latency is the DNN",
            {
                "figure": "Fig. 4",
                "claim": "Across classification, segmentation, detection and depth models, "
                "non-DNN work takes up to 56% of end-to-end latency on a medium image.",
            },  # fmt: skip
            plans=_models_plans,
            finish=_models_finish,
            metrics=_models_metrics,
            params=lambda s: {"models": list(s.models), "concurrency": s.models_concurrency},
        ),
        Experiment(
            "concurrency",
            "Concurrency: throughput saturates, queueing takes over",
            {
                "figure": "Fig. 5",
                "claim": "Throughput saturates at moderate concurrency; beyond it, latency grows "
                "linearly and queueing dominates it.",
            },  # fmt: skip
            plans=_concurrency_plans,
            finish=_concurrency_finish,
            metrics=_concurrency_metrics,
            params=lambda s: {"model": s.model, "concurrency": list(s.sweep)},
        ),
        Experiment(
            "image-sizes",
            "Image sizes: preprocessing grows with the photo, the DNN does not",
            {
                "figure": "Sec. 4 (image size)",
                "claim": "Preprocessing is up to 56% of end-to-end latency on a medium image and "
                "costs ~80% of throughput on a large one.",
            },  # fmt: skip
            plans=_sizes_plans,
            finish=_sizes_finish,
            prepare=_sizes_prepare,
            metrics=_sizes_metrics,
            params=lambda s: {"model": s.model, "concurrency": s.concurrency, "sizes": list(SIZES)},
        ),
        Experiment(
            "broker",
            "Two DNNs through a broker: fan-out and rate mismatch",
            {
                "figure": "Sec. 5 (multi-DNN pipelines)",
                "claim": "When two DNNs that produce at different rates are chained through a "
                "message broker, the broker and the queue in front of the slower stage "
                "become a large share of latency.",
            },  # fmt: skip
            plans=_broker_plans,
            finish=_broker_finish,
            metrics=_broker_metrics,
            params=lambda s: {
                "fanouts": list(s.fanouts),
                "concurrency": s.broker_concurrency,
                "detector": s.detector,
                "classifier": s.classifier,
            },  # fmt: skip
        ),
        Experiment(
            "accelerator",
            "A faster accelerator (simulated): the host becomes the bottleneck",
            {
                "figure": "Fig. 1 / headline",
                "claim": "On a GPU server, preprocessing and data movement, not the DNN, limit "
                "end-to-end throughput: up to ~80% of it is lost on large images.",
            },  # fmt: skip
            plans=_accel_plans,
            finish=_accel_finish,
            prepare=_accel_prepare,
            metrics=_accel_metrics,
            params=lambda s: {
                "model": s.model,
                "speedups": list(s.speedups),
                "concurrency": s.accel_concurrency,
                "max_batch": s.accel_max_batch,
            },  # fmt: skip
        ),
    )
}


def inference_alone(latency_ms: dict[int, float], max_batch: int) -> tuple[float, int]:
    """The best images/s a profile allows at batch sizes up to ``max_batch``."""
    best, best_b = 0.0, 1
    for b, ms in latency_ms.items():
        if b <= max_batch and ms > 0 and b * 1000.0 / ms > best:
            best, best_b = b * 1000.0 / ms, b
    return best, best_b
