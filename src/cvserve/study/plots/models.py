"""The models experiment's figure (paper Fig. 4)."""

from __future__ import annotations

import math

import numpy as np

from cvserve.bench.report import _colors, _figure
from cvserve.study.plots._kit import (
    Plot,
    _empty,
    _finish,
    _legend,
    _m,
    _name,
    _num,
    _order,
    _stacked_stages,
    _style,
    _title,
    _varying,
)
from cvserve.study.results import ExperimentResult


def plot_models(result: ExperimentResult) -> list[Plot]:
    pts = result.ok_points()
    if not pts:
        return []
    sim = any(p.simulated for p in pts)
    tasks = _order(str(p.labels.get("task", "?")) for p in pts)
    pts = sorted(pts, key=lambda p: tasks.index(str(p.labels.get("task", "?"))))  # stable
    keys = ["model", *_varying(pts, exclude=("model", "task"))]
    names = [_name(p, keys) for p in pts]
    task_color = dict(zip(tasks, _colors(len(tasks)), strict=True))
    y = np.arange(len(pts))

    fig, (ax_tp, ax_sh) = _figure(12, 0.45 * len(pts) + 2.4, ncols=2)
    tp = np.array([_m(p, "throughput_rps") for p in pts])
    colors = [task_color[str(p.labels.get("task", "?"))] for p in pts]
    bars = ax_tp.barh(y, np.nan_to_num(tp), color=colors, height=0.7)
    ax_tp.bar_label(
        bars, ["" if math.isnan(v) else f"{v:.0f}" for v in tp], padding=3, fontsize="small"
    )
    for task in tasks:  # one legend entry per task
        ax_tp.barh([0], [0], color=task_color[task], label=task)
    ax_tp.set_yticks(y, names, fontsize="small")
    ax_tp.invert_yaxis()
    ax_tp.margins(x=0.2)
    ax_tp.set(xlabel="throughput (req/s)", title=_title("throughput per model (color: task)", sim))
    _style(ax_tp, grid_axis="x")
    _legend(ax_tp, loc="lower right")

    shares = []
    for p in pts:
        pct = p.metrics.get("breakdown_pct")
        if isinstance(pct, dict) and pct:
            shares.append(pct)
        else:
            infer = _m(p, "infer_share_pct")
            shares.append({} if math.isnan(infer) else {"infer": infer, "rest": 100.0 - infer})
    if any(shares):
        _stacked_stages(ax_sh, names, shares, horizontal=True, first=("infer",), unit="%")
        ax_sh.set_xlabel("share of server latency (%)")
        ax_sh.set_xlim(0, 100)
        for i, p in enumerate(pts):
            infer = _m(p, "infer_share_pct")
            if math.isnan(infer):
                infer = _num(shares[i].get("infer"))
            if not math.isnan(infer):
                ax_sh.text(
                    1,
                    i,
                    f"infer {infer:.0f}%",
                    va="center",
                    fontsize="x-small",
                    color="#222222",
                    fontweight="bold",
                )
    else:
        _empty(ax_sh, "no breakdown measured")
    ax_sh.set_title(_title("inference vs everything else", sim))
    _finish(fig, result, "throughput and inference share per model", sim)
    return [Plot("models", _title("Throughput and inference share per model", sim), fig, sim)]
