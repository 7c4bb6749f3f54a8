"""The study's plots: one function per experiment, each returning its figures.

Each function reads an :class:`~cvserve.study.results.ExperimentResult` and draws what its
experiment varied (the labels) against what it measured (the metrics); a missing metric or
point leaves a gap, never an error. A plot that shows simulated inference says so in its
titles. Figures use matplotlib's object API on the Agg canvas, in the house style of
:mod:`cvserve.bench.report` (its figure factory, palette and stage colors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve.bench.report import _colors, _figure, _stage_colors
from cvserve.study.results import ExperimentResult, Point
from cvserve.trace import STAGES

__all__ = ["PLOTTERS", "Plot", "plot_experiment"]

SIMULATED_SUFFIX = " (simulated)"
_SIZES = ("small", "medium", "large")
_SERVERS = ("cvserve", "baseline")
_QUEUE_STAGES = ("queue", "batch_wait")


@dataclass
class Plot:
    """One figure of an experiment: ``name`` is its file stem, ``title`` its caption."""

    name: str
    title: str
    figure: Any  # matplotlib.figure.Figure
    simulated: bool


# --- small helpers ----------------------------------------------------------------------
def _num(value: Any) -> float:
    """A metric as a float; nan when missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _m(p: Point, key: str) -> float:
    return _num(p.metrics.get(key))


def _title(text: str, simulated: bool) -> str:
    return text + SIMULATED_SUFFIX if simulated else text


def _order(values: Iterable[Any], known: Sequence[Any] = ()) -> list[Any]:
    """Distinct values: the known ones in their order, then the rest as first seen."""
    seen = list(dict.fromkeys(values))
    return [v for v in known if v in seen] + [v for v in seen if v not in known]


def _varying(points: Sequence[Point], exclude: Iterable[str] = ()) -> list[str]:
    """Label keys whose values differ between ``points`` (to tell bars apart)."""
    skip = set(exclude)
    keys = _order(k for p in points for k in p.labels if k not in skip)
    return [k for k in keys if len({repr(p.labels.get(k)) for p in points}) > 1]


def _name(p: Point, keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        v = p.labels.get(k)
        parts.append(f"c={v}" if k == "concurrency" else str(v))
    return " · ".join(parts) or p.id


def _speedup_key(value: Any) -> tuple[int, float, str]:
    m = re.fullmatch(r"\s*([0-9.]+)\s*x\s*", str(value))
    return (0, float(m.group(1)), "") if m else (1, 0.0, str(value))


def _short(value: float, unit: str = "") -> str:
    """A bar label: whole numbers from 10 up, two significant figures below."""
    if math.isnan(value):
        return ""
    return (f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}") + unit


def _style(ax, *, grid_axis: str = "both") -> None:  # noqa: ANN001
    ax.grid(True, axis=grid_axis, alpha=0.3)


def _legend(ax, **kw: Any) -> None:  # noqa: ANN001
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", **kw)


def _empty(ax, text: str = "no measured points") -> None:  # noqa: ANN001
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _stacked_stages(
    ax,  # noqa: ANN001
    names: Sequence[str],
    parts: Sequence[dict[str, Any]],
    *,
    horizontal: bool,
    positions: Sequence[float] | None = None,
    first: Sequence[str] = (),
    unit: str = "ms",
) -> None:
    """Bars stacked by stage (stage vocabulary order, ``first`` at the base)."""
    colors = _stage_colors()
    pos = np.asarray(positions if positions is not None else np.arange(len(names)), float)
    base = np.zeros(len(names))
    known = [s for s in STAGES if any(s in d for d in parts)]
    extra = _order(k for d in parts for k in d if k not in known)
    stages = list(first) + [s for s in known + extra if s not in first]
    for stage in stages:
        vals = np.array([max(_num(d.get(stage)), 0.0) if stage in d else 0.0 for d in parts])
        vals = np.nan_to_num(vals)
        if not vals.any():
            continue
        color = colors.get(stage, "lightgray")
        if horizontal:
            ax.barh(pos, vals, left=base, color=color, label=stage, height=0.7)
        else:
            ax.bar(pos, vals, bottom=base, color=color, label=stage, width=0.7)
        base += vals
    if horizontal:
        ax.set_yticks(pos, names, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(f"mean {unit} per request")
        _style(ax, grid_axis="x")
    else:
        ax.set_xticks(pos, names, fontsize="small")
        ax.set_ylabel(f"mean {unit} per request")
        _style(ax, grid_axis="y")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = handles if horizontal else handles[::-1]  # match the stack as drawn
        names_ = labels if horizontal else labels[::-1]
        ax.legend(order, names_, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _finish(fig, result: ExperimentResult, text: str, simulated: bool) -> None:  # noqa: ANN001
    fig.suptitle(_title(f"{result.title}: {text}", simulated), fontsize="medium")


# --- 1. setups (paper Fig. 3) -----------------------------------------------------------
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


# --- 2. models (paper Fig. 4) -----------------------------------------------------------
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


# --- 3. concurrency (paper Fig. 5) ------------------------------------------------------
def _log2_axis(ax, xs: Sequence[float]) -> None:  # noqa: ANN001
    xs = sorted({x for x in xs if x > 0})
    if not xs:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()


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
        _log2_axis(ax, xs_all)
        _style(ax)
        ax.set_ylim(bottom=0)
        _legend(ax)
    _finish(fig, result, "throughput and latency vs concurrency", sim)
    return [Plot("concurrency", _title("Throughput and latency vs concurrency", sim), fig, sim)]


# --- 4. image sizes ---------------------------------------------------------------------
def plot_image_sizes(result: ExperimentResult) -> list[Plot]:
    pts = result.ok_points()
    if not pts:
        return []
    sim = any(p.simulated for p in pts)
    models = _order(p.labels.get("model") for p in pts)
    sizes = _order((p.labels.get("size") for p in pts), _SIZES)
    servers = _order((p.labels.get("server") for p in pts), _SERVERS)
    pts = sorted(
        pts,
        key=lambda p: (
            models.index(p.labels.get("model")),
            sizes.index(p.labels.get("size")),
            servers.index(p.labels.get("server")),
        ),
    )
    group_keys = ["size", *(["model"] if len(models) > 1 else [])]
    plots = []
    # Latency composition at the lowest concurrency, throughput at the highest.
    levels = sorted({p.labels.get("concurrency") or 0 for p in pts})
    light = [p for p in pts if (p.labels.get("concurrency") or 0) == levels[0]]
    loaded = [p for p in pts if (p.labels.get("concurrency") or 0) == levels[-1]]
    at_light = f" at c={levels[0]}" if len(levels) > 1 else ""
    at_load = f" at c={levels[-1]}" if len(levels) > 1 else ""

    with_bd = [p for p in light if isinstance(p.metrics.get("breakdown_ms"), dict)]
    if with_bd:
        pos, x, prev = [], -1.0, None
        for p in with_bd:
            group = tuple(p.labels.get(k) for k in group_keys)
            x += 1.0 if group == prev or prev is None else 1.6  # a gap between sizes
            prev = group
            pos.append(x)
        names = [f"{p.labels.get('server')}\n{_name(p, group_keys)}" for p in with_bd]
        fig, (ax,) = _figure(max(7.0, 0.8 * len(with_bd) + 3.5), 4.8)
        _stacked_stages(
            ax, names, [p.metrics["breakdown_ms"] for p in with_bd], horizontal=False, positions=pos
        )
        ax.set_title(_title("where the time goes, per image size and server" + at_light, sim))
        t = _title(
            f"Stage breakdown per image size and server{at_light} (mean ms per request)", sim
        )
        plots.append(Plot("image-sizes-breakdown", t, fig, sim))

    pts = loaded
    fig, (ax,) = _figure(8, 4.6)
    groups = _order(tuple(p.labels.get(k) for k in group_keys) for p in pts)
    width = 0.8 / max(len(servers), 1)
    for j, (server, color) in enumerate(zip(servers, _colors(len(servers)), strict=True)):
        xs, vals, notes = [], [], []
        for i, g in enumerate(groups):
            match = [
                p
                for p in pts
                if p.labels.get("server") == server
                and tuple(p.labels.get(k) for k in group_keys) == g
            ]
            if not match:
                continue
            xs.append(i + (j - (len(servers) - 1) / 2) * width)
            vals.append(_m(match[0], "throughput_rps"))
            lost = _m(match[0], "throughput_lost_pct")
            notes.append("" if math.isnan(lost) else f"-{lost:.0f}%")
        bars = ax.bar(xs, np.nan_to_num(vals), width=width * 0.95, color=color, label=str(server))
        ax.bar_label(bars, notes, padding=2, fontsize="x-small")
    alone = result.derived.get("dnn_alone_rps")
    alone_by_model = alone if isinstance(alone, dict) else {None: alone}
    for k, (model, value) in enumerate(alone_by_model.items()):
        v = _num(value)
        if not math.isnan(v):
            label = "DNN alone" + (f" ({model})" if model is not None else "")
            ax.axhline(v, color="black", linestyle=("--", ":", "-.")[k % 3], label=label)
    ax.set_xticks(range(len(groups)), [" · ".join(map(str, g)) for g in groups])
    ax.set(
        xlabel="image size",
        ylabel="throughput (req/s)",
        title=_title(f"throughput{at_load} vs the DNN alone (label: throughput lost)", sim),
    )
    ax.set_ylim(bottom=0)
    ax.margins(y=0.15)
    _style(ax, grid_axis="y")
    _legend(ax)
    plots.append(
        Plot(
            "image-sizes-throughput",
            _title(f"Throughput per image size{at_load} vs the DNN alone", sim),
            fig,
            sim,
        )
    )
    return plots


# --- 5. broker --------------------------------------------------------------------------
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
            _log2_axis(ax, xs_all)
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


# --- 6. accelerator ---------------------------------------------------------------------
def _grouped(ax, groups: list[str], series: list[tuple[str, dict[str, float], dict]]) -> None:  # noqa: ANN001
    """Grouped bars: ``series`` is [(label, {group: value}, bar style)]."""
    width = 0.8 / max(len(series), 1)
    for j, (label, values, style) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
        vals = [values[g] for g in groups if g in values]
        notes = style.pop("notes", None)
        bars = ax.bar(xs, np.nan_to_num(vals), width=width * 0.95, label=label, **style)
        if notes is not None:
            ax.bar_label(
                bars,
                [notes.get(g, "") for g in groups if g in values],
                fontsize="x-small",
                padding=1,
            )
    ax.set_xticks(range(len(groups)), groups)


def plot_accelerator(result: ExperimentResult) -> list[Plot]:
    pts = result.ok_points()
    plots = []
    sim_all = result.simulated or any(p.simulated for p in pts)
    if pts:
        sim = any(p.simulated for p in pts)
        speedups = sorted(_order(str(p.labels.get("speedup")) for p in pts), key=_speedup_key)
        series_keys = [
            "size",
            *(["model"] if len({p.labels.get("model") for p in pts}) > 1 else []),
        ]
        chosen: dict[tuple[str, str], Point] = {}  # the most loaded point per bar
        for p in pts:
            key = (str(p.labels.get("speedup")), _name(p, series_keys))
            best = chosen.get(key)
            if best is None or _num(p.labels.get("concurrency")) > _num(
                best.labels.get("concurrency")
            ):
                chosen[key] = p
        names = _order((k[1] for k in chosen), _SIZES)
        colors = dict(zip(names, _colors(len(names)), strict=True))
        series = []
        for name in names:
            e2e = {s: _m(p, "throughput_rps") for (s, n), p in chosen.items() if n == name}
            alone = {s: _m(p, "inference_alone_rps") for (s, n), p in chosen.items() if n == name}
            pct = {s: _m(p, "e2e_vs_inference_pct") for (s, n), p in chosen.items() if n == name}
            notes = {s: _short(v, "%") for s, v in pct.items()}
            series.append((f"{name}: end to end", e2e, {"color": colors[name], "notes": notes}))
            if any(not math.isnan(v) for v in alone.values()):
                series.append(
                    (
                        f"{name}: inference alone",
                        alone,
                        {"color": colors[name], "alpha": 0.35, "hatch": "//"},
                    )
                )
        fig, (ax,) = _figure(max(8.0, 1.6 * len(speedups) + 4.0), 4.8)
        _grouped(ax, speedups, series)
        ax.set_yscale("log")
        ax.set(
            xlabel="accelerator (speedup over the measured device, or profile)",
            ylabel="throughput (req/s, log scale)",
            title=_title("end to end vs inference alone (label: % of inference alone)", sim),
        )
        _style(ax, grid_axis="y")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
        _finish(fig, result, "what the host delivers of a faster accelerator", sim)
        t = _title("End-to-end vs inference-alone throughput per accelerator and image size", sim)
        plots.append(Plot("accelerator-throughput", t, fig, sim))

    needed = result.derived.get("cores_needed")
    per_1000 = result.derived.get("cores_per_1000_rps")
    if isinstance(needed, dict) and needed:
        table = {str(s): v for s, v in needed.items()}
        groups = sorted(table, key=_speedup_key)
        sizes = _order((str(z) for v in table.values() if isinstance(v, dict) for z in v), _SIZES)
        xlabel = "accelerator"
    elif isinstance(per_1000, dict) and per_1000:
        groups, xlabel = ["per 1000 req/s"], ""
        table = {groups[0]: {str(z): v for z, v in per_1000.items()}}
        sizes = _order(table[groups[0]], _SIZES)
    else:
        return plots
    colors = dict(zip(sizes, _colors(len(sizes)), strict=True))
    servers = _order(
        (
            str(k)
            for v in table.values()
            if isinstance(v, dict)
            for w in v.values()
            if isinstance(w, dict)
            for k in w
        ),
        _SERVERS,
    )
    series = []
    for size in sizes:
        for k, server in enumerate(servers):
            vals = {}
            for g, by_size in table.items():
                by_size = (
                    {str(z): c for z, c in by_size.items()} if isinstance(by_size, dict) else {}
                )
                cell = by_size.get(size)
                if isinstance(cell, dict) and not math.isnan(_num(cell.get(server))):
                    vals[g] = _num(cell.get(server))
            notes = {g: _short(v) for g, v in vals.items()}
            style = {"color": colors[size], "notes": notes}
            if k:
                style |= {"alpha": 0.45, "hatch": "//"}
            series.append((f"{size}: {server}", vals, style))
    fig, (ax,) = _figure(max(8.0, 1.8 * len(groups) + 4.0), 4.8)
    _grouped(ax, groups, series)
    values = [v for _, vals, _ in series for v in vals.values() if v > 0]
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
    cores = _num(result.machine.get("cores"))
    if not math.isnan(cores):
        ax.axhline(cores, color="black", linestyle=":", label=f"this machine: {cores:g} cores")
    ax.set(
        xlabel=xlabel,
        ylabel="host CPU cores for preprocessing",
        title=_title("host cores needed to feed the accelerator", sim_all),
    )
    _style(ax, grid_axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _finish(fig, result, "host cores of preprocessing needed", sim_all)
    t = _title("Host cores of preprocessing needed per accelerator and image size", sim_all)
    plots.append(Plot("accelerator-cores", t, fig, sim_all))
    return plots


PLOTTERS: dict[str, Callable[[ExperimentResult], list[Plot]]] = {
    "setups": plot_setups,
    "models": plot_models,
    "concurrency": plot_concurrency,
    "image-sizes": plot_image_sizes,
    "broker": plot_broker,
    "accelerator": plot_accelerator,
}


def plot_experiment(result: ExperimentResult) -> list[Plot]:
    """The figures of one experiment (none when it has no measured points)."""
    plotter = PLOTTERS.get(result.experiment)
    return plotter(result) if plotter else []
