"""Concurrency (paper Fig. 5): throughput saturates, queueing takes over."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvserve.study.experiments._common import (
    QUEUE,
    Experiment,
    finding,
    model_server,
    rounded,
    share,
    stage_sum,
)
from cvserve.study.plan import StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


def _concurrency_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
    s = ctx.settings
    server = model_server("concurrency", s.model)
    return [
        StudyPoint(
            id=f"c{c}",
            labels={"model": s.model, "concurrency": c},
            server=server,
            target=s.model,
            concurrency=c,
        )
        for c in s.sweep
    ]


def _concurrency_metrics(plan, metrics, ctx, result) -> None:
    metrics["queue_ms"] = rounded(stage_sum(metrics.get("breakdown_ms", {}), QUEUE), 3)
    metrics["queue_share_pct"] = rounded(share(metrics, QUEUE), 2)


def _concurrency_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    pts = sorted(result.ok_points(), key=lambda p: p.labels["concurrency"])
    if len(pts) < 2:
        return
    peak = max(p.metrics["throughput_rps"] for p in pts)
    # saturation: the first concurrency within 10% of the peak throughput
    sat = next(p for p in pts if p.metrics["throughput_rps"] >= 0.9 * peak)
    last = pts[-1]
    result.derived["saturation_concurrency"] = sat.labels["concurrency"]
    result.derived["peak_rps"] = rounded(peak)
    result.findings.append(
        finding(
            "concurrency-saturation",
            "Throughput reaches 90% of its peak ({peak} req/s) at {c} concurrent requests; "
            "at {cmax}, {q}% of a request's {lat} ms is queueing (queue + batch_wait).",
            peak=rounded(peak),
            c=sat.labels["concurrency"],
            cmax=last.labels["concurrency"],
            q=rounded(last.metrics["queue_share_pct"], 0),
            lat=rounded(last.metrics["mean_ms"], 0),
        )  # fmt: skip
    )


EXPERIMENT = Experiment(
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
)
