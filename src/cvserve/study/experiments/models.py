"""Models and tasks (paper Fig. 4): how much of the latency is the DNN."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvserve.study.experiments._common import QUEUE_ALL, Experiment, finding, rounded, share
from cvserve.study.plan import ServerSpec, StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


def _models_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
    s = ctx.settings
    args: list[str] = []
    for m in s.models:
        args += ["--model", m]
    server = ServerSpec(key="models", args=(*args, *QUEUE_ALL))
    return [
        StudyPoint(
            id=m,
            labels={"model": m, "task": ctx.task_of(m)},
            server=server,
            target=m,
            concurrency=s.models_concurrency,
        )
        for m in s.models
    ]


def _models_metrics(plan, metrics, ctx, result) -> None:
    metrics["infer_share_pct"] = rounded(share(metrics, ("infer",)), 2)


def _models_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    pts = result.ok_points()
    if not pts:
        return
    shares = sorted(pts, key=lambda p: p.metrics["infer_share_pct"])
    lo, hi = shares[0], shares[-1]
    f = finding(
        "models-infer-share",
        "Inference is {lo}% to {hi}% of end-to-end latency across {n} models at concurrency "
        "{c}: the rest is preprocessing, queueing, post-processing and encoding.",
        lo=rounded(lo.metrics["infer_share_pct"], 0), hi=rounded(hi.metrics["infer_share_pct"], 0),
        n=len(pts), c=ctx.settings.models_concurrency,
    )  # fmt: skip
    result.findings.append(f)
    result.findings.append(
        finding(
            "models-lowest",
            "The smallest inference share is {name}'s ({task}): {pct}%.",
            {"name": lo.labels["model"], "task": lo.labels["task"]},
            pct=rounded(lo.metrics["infer_share_pct"], 0),
        )
    )


EXPERIMENT = Experiment(
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
)
