"""The image-sizes experiment's figures."""

from __future__ import annotations

import math

import numpy as np

from cvserve.bench.report import _colors, _figure
from cvserve.study.plots._kit import (
    _SERVERS,
    _SIZES,
    Plot,
    _legend,
    _m,
    _name,
    _num,
    _order,
    _stacked_stages,
    _style,
    _title,
)
from cvserve.study.results import ExperimentResult


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
