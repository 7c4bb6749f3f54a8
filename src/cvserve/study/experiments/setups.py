"""Serving setups (paper Fig. 3): one model served several ways."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cvserve.study.experiments._common import Experiment, finding, model_server, rounded
from cvserve.study.plan import ServerSpec, StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


_SETUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (id, display name, cvserve serve flags); "baseline" and peers are their own servers
    ("full-size-decode", "full-size decode", ("--decoder", "pil")),
    ("no-batching", "no batching", ("--max-batch-size", "1")),
    ("2-instances", "2 instances", ("--instances", "2", "--intra-op-threads", "1")),
    ("cvserve", "cvserve", ()),
)


def _setups_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
    s = ctx.settings
    c = s.concurrency
    plans = [
        StudyPoint(
            id="baseline",
            labels={"setup": "baseline", "model": s.model, "concurrency": c},
            server=ServerSpec(key="setups-baseline", kind="baseline", model=s.model),
            target=s.model,
            concurrency=c,
        )
    ]
    for sid, name, flags in _SETUPS:
        plans.append(
            StudyPoint(
                id=sid,
                labels={"setup": name, "model": s.model, "concurrency": c},
                server=model_server(f"setups-{sid}", s.model, *flags),
                target=s.model,
                concurrency=c,
            )
        )
    for peer, reason in ctx.peers().items():
        plans.append(
            StudyPoint(
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
        {p.labels["setup"]: rounded(thr[p.id] / base, 2) for p in result.ok_points()}
        if base
        else {}
    )
    full = result.point("cvserve")
    if not base or full is None or full.status != "ok":
        return
    model, c = full.labels["model"], full.labels["concurrency"]
    x = rounded(thr["cvserve"] / base, 2)
    f = finding(
        "setups-speedup",
        "At concurrency {c}, cvserve serves {model} at {thr} req/s, {x}x the {base} req/s of "
        "the plain baseline server (full decode, PIL resize, batch 1).",
        {"model": model}, c=c, thr=rounded(thr["cvserve"]), x=x, base=rounded(base),
    )  # fmt: skip
    result.findings.append(f)
    costs = {}
    for sid, name in (("full-size-decode", "full-size decoding"), ("no-batching", "no batching")):
        if sid in thr:
            costs[sid] = (name, rounded(100.0 * (1.0 - thr[sid] / thr["cvserve"]), 0))
    if costs:
        keys = {sid: sid.replace("-", "_") for sid in costs}
        parts = [
            f"{name} costs {{{keys[sid]}}}% of its throughput" for sid, (name, _) in costs.items()
        ]
        result.findings.append(
            finding(
                "setups-ablation",
                "Against full cvserve, " + " and ".join(parts) + ".",
                **{keys[sid]: v for sid, (_, v) in costs.items()},
            )
        )


EXPERIMENT = Experiment(
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
)
