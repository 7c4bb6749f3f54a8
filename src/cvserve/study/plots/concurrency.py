"""The concurrency experiment's figure (paper Fig. 5)."""

from __future__ import annotations

import math

import numpy as np

from cvserve.bench.report import _colors, _figure, log2_axis
from cvserve.study.plots._kit import (
    Plot,
    _finish,
    _legend,
    _m,
    _name,
    _num,
    _style,
    _title,
    _varying,
)
from cvserve.study.results import ExperimentResult, Point


def plot_concurrency(result: ExperimentResult) -> list[Plot]:
    pts = [p for p in result.ok_points() if not math.isnan(_num(p.labels.get("concurrency")))]
    if not pts:
        return []
    sim = any(p.simulated for p in pts)
    series_keys = _varying(pts, exclude=("concurrency",)) or ["model"]
    groups: dict[str, list[Point]] = {}
    for p in pts:
        groups.setdefault(_name(p, series_keys), []).append(p)

    fig, (ax_tp, ax_lat, ax_q) = _figure(15, 4.4, ncols=3)
    xs_all = []
    for color, (label, gp) in zip(_colors(len(groups)), groups.items(), strict=True):
        gp = sorted(gp, key=lambda p: _num(p.labels["concurrency"]))
        x = np.array([_num(p.labels["concurrency"]) for p in gp])
        xs_all += list(x)
        mean = np.array([_m(p, "mean_ms") for p in gp])
        queue = np.array([_m(p, "queue_ms") for p in gp])
        ax_tp.plot(x, [_m(p, "throughput_rps") for p in gp], "o-", color=color, label=label)
        ax_lat.plot(x, mean, "o-", color=color, label=f"{label}: mean latency")
        if not np.isnan(queue).all():
            ax_lat.plot(x, queue, "s--", color=color, label=f"{label}: queueing")
            ax_lat.fill_between(x, 0, np.nan_to_num(queue), color=color, alpha=0.15)
            ax_lat.fill_between(
                x, np.nan_to_num(queue), np.nan_to_num(mean), color=color, alpha=0.05
            )
        share = np.array([_m(p, "queue_share_pct") for p in gp])
        if np.isnan(share).all():
            share = 100.0 * queue / mean
        ax_q.plot(x, share, "o-", color=color, label=label)
    ax_tp.set(
        xlabel="concurrency (requests in flight)",
        ylabel="throughput (req/s)",
        title=_title("throughput", sim),
    )
    ax_lat.set(
        xlabel="concurrency (requests in flight)",
        ylabel="ms",
        title=_title("mean latency: queueing (shaded) and the rest", sim),
    )
    ax_q.set(
        xlabel="concurrency (requests in flight)",
        ylabel="% of mean latency",
        title=_title("queueing share (queue + batch_wait)", sim),
    )
    ax_q.set_ylim(0, 100)
    for ax in (ax_tp, ax_lat, ax_q):
        log2_axis(ax, xs_all)
        _style(ax)
        ax.set_ylim(bottom=0)
        _legend(ax)
    _finish(fig, result, "throughput and latency vs concurrency", sim)
    return [Plot("concurrency", _title("Throughput and latency vs concurrency", sim), fig, sim)]
