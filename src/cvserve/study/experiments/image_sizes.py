"""Image sizes (paper Sec. 4): preprocessing grows with the photo, the DNN does not."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvserve.study.experiments._common import (
    PRE,
    Experiment,
    finding,
    model_server,
    rounded,
    share,
    stage_sum,
)
from cvserve.study.plan import SIZES, ServerSpec, StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


def _sizes_prepare(ctx: StudyContext, result: ExperimentResult) -> None:
    alone = ctx.dnn_alone(ctx.settings.model)
    result.derived["dnn_alone_rps"] = alone["rps"]
    result.derived["dnn_alone_batch"] = alone["batch"]
    result.derived["dnn_alone_profile"] = alone["latency_ms"]


def _sizes_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
    """Each size at concurrency 1 (where the latency goes) and under load (throughput)."""
    s = ctx.settings
    plans = []
    for server_name, spec in (
        ("cvserve", model_server("sizes-cvserve", s.model)),
        ("baseline", ServerSpec(key="sizes-baseline", kind="baseline", model=s.model)),
    ):
        for size in SIZES:
            for c, suffix in ((1, "-c1"), (s.concurrency, "")):
                plans.append(
                    StudyPoint(
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
    metrics["preprocess_ms"] = rounded(stage_sum(bd, PRE), 3)
    metrics["preprocess_share_pct"] = rounded(share(metrics, PRE), 2)
    alone = result.derived.get("dnn_alone_rps")
    if alone and plan.concurrency > 1:  # at c=1 throughput is bound by latency, not lost
        metrics["throughput_lost_pct"] = rounded(
            100.0 * (1.0 - metrics["throughput_rps"] / alone), 2
        )


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
            finding(
                f"sizes-{size}",
                "On {size} photos, one request at a time, preprocessing (decode + resize + "
                "normalize) is {pre}% of cvserve's latency and {pre_b}% of the baseline's; "
                "at concurrency {c} cvserve serves {thr} req/s against {alone} for the DNN "
                "alone, {lost}% of the DNN's throughput lost ({lost_b}% for the baseline). "
                "The paper reports up to 56% of latency on a medium image and ~80% of "
                "throughput lost on a large one.",
                {"size": size},
                pre=rounded(cv1[0].metrics["preprocess_share_pct"], 0),
                pre_b=rounded(bl1[0].metrics["preprocess_share_pct"], 0),
                c=c,
                thr=rounded(cv[0].metrics["throughput_rps"]),
                alone=rounded(result.derived.get("dnn_alone_rps", 0.0)),
                lost=rounded(cv[0].metrics.get("throughput_lost_pct", 0.0), 0),
                lost_b=rounded(bl[0].metrics.get("throughput_lost_pct", 0.0), 0),
            )
        )


EXPERIMENT = Experiment(
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
)
