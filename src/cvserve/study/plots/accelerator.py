"""The accelerator experiment's figures (simulated inference)."""

from __future__ import annotations

import math

import numpy as np

from cvserve.bench.report import _colors, _figure
from cvserve.study.plots._kit import (
    _SERVERS,
    _SIZES,
    Plot,
    _finish,
    _m,
    _name,
    _num,
    _order,
    _short,
    _speedup_key,
    _style,
    _title,
)
from cvserve.study.results import ExperimentResult, Point


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
