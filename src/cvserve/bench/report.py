"""PNG plots of one or more bench results, overlaid for comparison (one color per result).

- ``throughput_latency_{closed,open}.png``: throughput, and mean latency with the server's
  queue time (``queue`` + ``batch_wait``) as its own line, against concurrency or offered
  rate (the paper's Figure 5).
- ``breakdown.png``: stacked mean time per stage for every point.
- ``latency_cdf.png``: the latency distribution of every point (needs the rows file).

Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot state, no
display, safe from any thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvserve.bench.results import BenchResult, PointSummary, load_result
from cvserve.trace import STAGES

__all__ = ["log2_axis", "report"]

_DPI = 110


def _figure(width: float, height: float, ncols: int = 1):  # noqa: ANN202
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _labels(results: list[BenchResult], names: list[str]) -> list[str]:
    labels = [r.label or n for r, n in zip(results, names, strict=True)]
    if len(set(labels)) < len(labels):  # keep the legend unambiguous
        labels = [f"{lab} ({i + 1})" for i, lab in enumerate(labels)]
    return labels


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _stage_colors() -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {s: cmap(i % 20) for i, s in enumerate(STAGES)}


def log2_axis(ax, xs: Sequence[float]) -> None:  # noqa: ANN001
    """A base-2 log x axis with a tick at each measured value (1, 2, 4 ... not 1.5, 2.5)."""
    xs = sorted({x for x in xs if x > 0})
    if not xs:
        return
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()


def _plot_load(results: list[BenchResult], labels: list[str], mode: str, path: Path) -> Path | None:
    series = []
    for r, label in zip(results, labels, strict=True):
        pts = sorted(
            (p for p in r.points if p.mode == mode),
            key=lambda p: p.concurrency if mode == "closed" else p.rate,  # type: ignore[arg-type,return-value]
        )
        if pts:
            series.append((label, pts))
    if not series:
        return None
    fig, (ax_tp, ax_lat) = _figure(11, 4.2, ncols=2)
    xlabel = "concurrency (requests in flight)" if mode == "closed" else "offered rate (req/s)"
    for color, (label, pts) in zip(_colors(len(series)), series, strict=True):
        x = [p.concurrency if mode == "closed" else p.rate for p in pts]
        ax_tp.plot(x, [p.throughput_rps for p in pts], "o-", color=color, label=label)
        mean = [np.nan if p.latency_ms["mean"] is None else p.latency_ms["mean"] for p in pts]
        ax_lat.plot(x, mean, "o-", color=color, label=f"{label}: mean latency")
        ax_lat.plot(x, [p.queue_ms for p in pts], "s--", color=color, label=f"{label}: queue time")
    if mode == "open":
        rates = [p.rate for _, pts in series for p in pts]
        lim = [min(rates), max(rates)]
        ax_tp.plot(lim, lim, ":", color="gray", label="offered")
    else:  # concurrencies double (1, 2, 4 ...): a log2 axis ticked where measured
        xlabel += ", log2 scale"
        for ax in (ax_tp, ax_lat):
            log2_axis(ax, [p.concurrency for _, pts in series for p in pts])
    ax_tp.set(xlabel=xlabel, ylabel="throughput (req/s)", title="throughput")
    ax_lat.set(xlabel=xlabel, ylabel="ms", title="latency and queue time (queue + batch_wait)")
    for ax in (ax_tp, ax_lat):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def _plot_breakdown(results: list[BenchResult], labels: list[str], path: Path) -> Path | None:
    bars: list[tuple[str, PointSummary]] = []
    for r, label in zip(results, labels, strict=True):
        prefix = f"{label}\n" if len(results) > 1 else ""
        bars += [(prefix + p.load_label, p) for p in r.points if p.breakdown_ms]
    if not bars:
        return None
    fig, (ax,) = _figure(max(6.0, 0.6 * len(bars) + 3.0), 4.8)
    colors = _stage_colors()
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for stage in STAGES:
        ms = np.array([max(p.breakdown_ms.get(stage, 0.0), 0.0) for _, p in bars])
        if not ms.any():
            continue
        ax.bar(x, ms, bottom=bottom, color=colors[stage], label=stage, width=0.7)
        bottom += ms
    ax.set_xticks(x, [name for name, _ in bars], fontsize="small")
    ax.set(ylabel="mean ms per request", title="where the time goes (stage breakdown)")
    ax.grid(True, axis="y", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()  # top of the stack first, as drawn
    ax.legend(handles[::-1], names[::-1], fontsize="small", loc="upper left",
              bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    fig.savefig(path)
    return path


def _plot_cdf(results: list[BenchResult], labels: list[str], path: Path) -> Path | None:
    curves = []
    for r, label in zip(results, labels, strict=True):
        rows = r.rows
        if not rows:
            continue
        ok = rows["measured"] & (rows["status"] >= 200) & (rows["status"] < 300)
        for p in r.points:
            lat = np.sort(rows["latency"][ok & (rows["point"] == p.index)]) * 1000.0
            if lat.size:
                curves.append((label, p, lat))
    if not curves:
        return None
    fig, (ax,) = _figure(8, 4.8)
    single = len(results) == 1  # one result: a color per point; several: a color per result
    colors = dict(zip(labels, _colors(len(labels)), strict=True))
    point_colors = _colors(len(curves))
    styles = ["-", "--", "-.", ":"]
    seen: dict[str, int] = {}
    for k, (label, p, lat) in enumerate(curves):
        i = seen[label] = seen.get(label, -1) + 1  # the i-th point of this result
        y = np.arange(1, lat.size + 1) / lat.size
        color, style = (point_colors[k], "-") if single else (colors[label], styles[i % 4])
        name = p.load_label if single else f"{label} {p.load_label}"
        ax.step(lat, y, where="post", color=color, linestyle=style, label=name)
    ax.set_xscale("log")
    ax.set(xlabel="latency (ms, log scale)", ylabel="fraction of requests", title="latency CDF")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path)
    return path


def report(
    results: Sequence[str | os.PathLike[str] | BenchResult], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write the PNG plots for ``results`` (files or loaded results) into ``out_dir``.

    Returns the paths written; a plot with nothing to show (no open-loop points, no rows)
    is skipped.
    """
    if not results:
        raise ValueError("no results to report")
    loaded, names = [], []
    for item in results:
        if isinstance(item, BenchResult):
            loaded.append(item)
            names.append(item.label or "result")
        else:
            loaded.append(load_result(item))
            names.append(Path(item).stem)
    labels = _labels(loaded, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_load(loaded, labels, "closed", out / "throughput_latency_closed.png"),
        _plot_load(loaded, labels, "open", out / "throughput_latency_open.png"),
        _plot_breakdown(loaded, labels, out / "breakdown.png"),
        _plot_cdf(loaded, labels, out / "latency_cdf.png"),
    ]
    return [p for p in written if p is not None]
