"""The broker experiment's figures."""

from __future__ import annotations

import math
import re

import numpy as np

from cvserve.bench.report import _colors, _figure, log2_axis
from cvserve.study.plots._kit import (
    Plot,
    _finish,
    _legend,
    _m,
    _name,
    _num,
    _order,
    _style,
    _title,
    _varying,
)
from cvserve.study.results import ExperimentResult, Point


def _broker_lines(ax_sh, ax_tp, pts: list[Point], sim: bool) -> None:  # noqa: ANN001
    series_keys = _varying(pts, exclude=("fanout", "pipeline")) or ["broker"]
    groups: dict[str, list[Point]] = {}
    for p in pts:
        groups.setdefault(_name(p, series_keys), []).append(p)
    xs_all = []
    for color, (label, gp) in zip(_colors(len(groups)), groups.items(), strict=True):
        gp = sorted(gp, key=lambda p: _num(p.labels["fanout"]))
        x = [_num(p.labels["fanout"]) for p in gp]
        xs_all += x
        ax_sh.plot(x, [_m(p, "broker_share_pct") for p in gp], "o-", color=color, label=label)
        tp = [_m(p, "items_per_s") for p in gp]
        if all(math.isnan(v) for v in tp):
            tp = [_m(p, "throughput_rps") for p in gp]
        ax_tp.plot(x, tp, "o-", color=color, label=label)
    for ax in (ax_sh, ax_tp):
        if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 8:
            log2_axis(ax, xs_all)
        else:
            ax.set_xticks(sorted(set(xs_all)))
        ax.set_xlabel("fan-out (crops per image)")


def _broker_bars(ax_sh, ax_tp, pts: list[Point], sim: bool) -> None:  # noqa: ANN001
    keys = _varying(pts, exclude=("pipeline", "fanout")) or ["broker"]
    names = [_name(p, keys) for p in pts]
    colors = _colors(len(pts))
    x = np.arange(len(pts))
    share = [_m(p, "broker_share_pct") for p in pts]
    bars = ax_sh.bar(x, np.nan_to_num(share), color=colors, width=0.6)
    ax_sh.bar_label(bars, ["" if math.isnan(v) else f"{v:.1f}%" for v in share], fontsize="small")
    tp = [_m(p, "items_per_s") for p in pts]
    if all(math.isnan(v) for v in tp):
        tp = [_m(p, "throughput_rps") for p in pts]
    bars = ax_tp.bar(x, np.nan_to_num(tp), color=colors, width=0.6)
    ax_tp.bar_label(bars, ["" if math.isnan(v) else f"{v:.0f}" for v in tp], fontsize="small")
    for ax in (ax_sh, ax_tp):
        ax.set_xticks(x, names, fontsize="small")
        ax.set_xlabel("broker (fan-out: the image's text regions)")


def plot_broker(result: ExperimentResult) -> list[Plot]:
    ok = result.ok_points()
    plots = []
    for pipeline in _order(p.labels.get("pipeline") for p in ok):
        pts = [p for p in ok if p.labels.get("pipeline") == pipeline]
        sim = any(p.simulated for p in pts)
        fanned = [p for p in pts if not math.isnan(_num(p.labels.get("fanout")))]
        fig, (ax_sh, ax_tp) = _figure(11, 4.2, ncols=2)
        if fanned:
            _broker_lines(ax_sh, ax_tp, fanned, sim)
        else:
            _broker_bars(ax_sh, ax_tp, pts, sim)
        uses_items = any(not math.isnan(_m(p, "items_per_s")) for p in pts)
        ax_sh.set(ylabel="% of mean latency", title=_title("broker share of latency", sim))
        ax_tp.set(
            ylabel="items/s" if uses_items else "throughput (req/s)",
            title=_title("items/s (crops through stage B)" if uses_items else "throughput", sim),
        )
        for ax in (ax_sh, ax_tp):
            ax.set_ylim(bottom=0)
            ax.margins(y=0.15)
            _style(ax)
            _legend(ax)
        _finish(fig, result, f"pipeline {pipeline}", sim)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", str(pipeline)).strip("-") or "pipeline"
        what = "vs fan-out" if fanned else "per broker"
        t = _title(f"Pipeline {pipeline}: broker share and throughput {what}", sim)
        plots.append(Plot(f"broker-{slug}", t, fig, sim))
    return plots
