"""What every study plot shares: the :class:`Plot` record, the house style (from
:mod:`cvserve.bench.report`), stacked stage bars, titles that say "simulated"."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve.bench.report import _stage_colors
from cvserve.study.results import ExperimentResult, Point
from cvserve.trace import STAGES

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
