"""Two DNNs through a broker (paper Sec. 5): fan-out and rate mismatch."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from cvserve.study.experiments._common import Experiment, finding, rounded, share
from cvserve.study.plan import ServerSpec, StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


def user_pipelines(ctx: StudyContext) -> list[dict]:
    """The pipelines of ``--pipeline FILE`` as config entries (checked as start-up would)."""
    if ctx.config.pipelines is None:
        return []
    from cvserve.config import config_to_dict, load_config

    return config_to_dict(load_config(ctx.config.pipelines))["pipelines"]


def _broker_config(ctx: StudyContext, broker: str) -> str:
    import json

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
    for p in user_pipelines(ctx):  # as declared, every step where its file put it
        lines.append(f"  - {json.dumps(p)}")
    return "\n".join(lines) + "\n"


def _broker_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
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
            StudyPoint(
                id=f"ocr-{broker}",
                labels={"pipeline": "ocr", "broker": broker, "fanout": None, "concurrency": c},
                server=server,
                target="ocr",
                kind="pipeline",
                images="ocr",
                concurrency=c,
                skip=reason or ctx.ocr_missing(),
            )
        )
        for n in s.fanouts:
            plans.append(
                StudyPoint(
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
        for p in user_pipelines(ctx):
            plans.append(
                StudyPoint(
                    id=f"{p['name']}-{broker}",
                    labels={
                        "pipeline": p["name"],
                        "broker": broker,
                        "fanout": None,
                        "concurrency": c,
                    },  # fmt: skip
                    server=server,
                    target=p["name"],
                    kind="pipeline",
                    images="medium",
                    concurrency=c,
                    skip=reason,
                )
            )
    return plans


def _broker_metrics(plan, metrics, ctx, result) -> None:
    metrics["broker_ms"] = rounded(metrics.get("breakdown_ms", {}).get("broker", 0.0), 3)
    metrics["broker_share_pct"] = rounded(share(metrics, ("broker",)), 2)
    n = plan.labels.get("fanout")
    metrics["items_per_s"] = rounded(metrics["throughput_rps"] * n, 2) if n else None


def _broker_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    dc = [p for p in result.ok_points(pipeline="detect-classify")]
    if not dc:
        return
    # Stage B's capacity: the most crops per second it ever classified in this run.
    cap = max(p.metrics["items_per_s"] or 0.0 for p in dc)
    result.derived["stage_b_items_per_s"] = rounded(cap, 2)
    for broker in ("inprocess", "redis"):
        pts = sorted(result.ok_points(pipeline="detect-classify", broker=broker),
                     key=lambda p: p.labels["fanout"])  # fmt: skip
        if len(pts) < 2:
            continue
        lo, hi = pts[0], pts[-1]
        f = finding(
            f"broker-fanout-{broker}",
            "Over the {b} broker, going from {n0} to {n1} objects per image takes the "
            "broker's share of latency (publish to consume, including the queue in front of "
            "the classifier) from {s0}% to {s1}% and throughput from {t0} to {t1} req/s.",
            {"b": broker}, n0=lo.labels["fanout"], n1=hi.labels["fanout"],
            s0=rounded(lo.metrics["broker_share_pct"], 0), s1=rounded(hi.metrics["broker_share_pct"], 0),
            t0=rounded(lo.metrics["throughput_rps"], 2), t1=rounded(hi.metrics["throughput_rps"], 2),
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
            finding(
                "broker-redis-cost",
                "Redis Streams instead of the in-process broker adds {d} ms of broker time per "
                "request (median over {n} fan-outs); the classifier stage peaked at {cap} crops/s, "
                "so fan-outs past that rate queue in front of it whatever the broker.",
                d=rounded(statistics.median(pairs), 1),
                n=len(pairs),
                cap=rounded(cap, 1),
            )  # fmt: skip
        )


EXPERIMENT = Experiment(
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
)
