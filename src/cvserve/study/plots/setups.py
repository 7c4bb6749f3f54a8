"""The setups experiment's figure (paper Fig. 3)."""

from __future__ import annotations

import math

import numpy as np

from cvserve.bench.report import _colors, _figure
from cvserve.study.plots._kit import (
    Plot,
    _finish,
    _legend,
    _m,
    _name,
    _num,
    _stacked_stages,
    _style,
    _title,
    _varying,
)
from cvserve.study.results import ExperimentResult


def plot_setups(result: ExperimentResult) -> list[Plot]:
    pts = result.ok_points()
    if not pts:
        return []
    sim = any(p.simulated for p in pts)
    keys = ["setup", *_varying(pts, exclude=("setup",))]
    names = [_name(p, keys) for p in pts]
    ratios = result.derived.get("x_baseline") or {}
    y = np.arange(len(pts))

    fig, (ax_tp, ax_lat) = _figure(11, 0.45 * len(pts) + 2.2, ncols=2)
    tp = np.array([_m(p, "throughput_rps") for p in pts])
    bars = ax_tp.barh(y, np.nan_to_num(tp), color=_colors(len(pts)), height=0.7)
    notes = []
    for p, v in zip(pts, tp, strict=True):
        r = math.nan
        if isinstance(ratios, dict):
            r = _num(ratios.get(p.labels.get("setup"), ratios.get(p.id)))
        notes.append(
            "" if math.isnan(v) else f"{v:.0f}" + ("" if math.isnan(r) else f"  ({r:.2f}x)")
        )
    ax_tp.bar_label(bars, notes, padding=3, fontsize="small")
    ax_tp.set_yticks(y, names, fontsize="small")
    ax_tp.invert_yaxis()
    ax_tp.margins(x=0.25)
    ax_tp.set(xlabel="throughput (req/s)", title=_title("throughput (x baseline)", sim))
    _style(ax_tp, grid_axis="x")

    h = 0.38
    for off, key, label, color in (
        (-h / 2, "p50_ms", "p50", "tab:blue"),
        (h / 2, "p99_ms", "p99", "tab:orange"),
    ):
        vals = np.array([_m(p, key) for p in pts])
        if not np.isnan(vals).all():
            ax_lat.barh(y + off, np.nan_to_num(vals), height=h, color=color, label=label)
    ax_lat.set_yticks(y, names, fontsize="small")
    ax_lat.invert_yaxis()
    ax_lat.set(xlabel="latency (ms)", title=_title("latency p50 / p99", sim))
    _style(ax_lat, grid_axis="x")
    _legend(ax_lat, loc="lower right")
    _finish(fig, result, "throughput and latency per setup", sim)
    plots = [Plot("setups", _title("Throughput and latency per setup", sim), fig, sim)]

    with_bd = [p for p in pts if isinstance(p.metrics.get("breakdown_ms"), dict)]
    if with_bd:
        fig, (ax,) = _figure(10, 0.45 * len(with_bd) + 2.0)
        _stacked_stages(
            ax,
            [_name(p, keys) for p in with_bd],
            [p.metrics["breakdown_ms"] for p in with_bd],
            horizontal=True,
        )
        ax.set_title(_title("where the time goes, per setup", sim))
        t = _title("Stage breakdown per setup (mean ms per request)", sim)
        plots.append(Plot("setups-breakdown", t, fig, sim))
    return plots
