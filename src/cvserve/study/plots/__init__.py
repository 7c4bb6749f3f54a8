"""The study's plots: one function per experiment, each returning its figures.

Each function reads an :class:`~cvserve.study.results.ExperimentResult` and draws what its
experiment varied (the labels) against what it measured (the metrics); a missing metric or
point leaves a gap, never an error. A plot that shows simulated inference says so in its
titles. Figures use matplotlib's object API on the Agg canvas, in the house style of
:mod:`cvserve.bench.report` (its figure factory, palette and stage colors).
"""

from __future__ import annotations

from collections.abc import Callable

from cvserve.study.plots._kit import Plot
from cvserve.study.plots.accelerator import plot_accelerator
from cvserve.study.plots.broker import plot_broker
from cvserve.study.plots.concurrency import plot_concurrency
from cvserve.study.plots.image_sizes import plot_image_sizes
from cvserve.study.plots.models import plot_models
from cvserve.study.plots.setups import plot_setups
from cvserve.study.results import ExperimentResult

__all__ = ["PLOTTERS", "Plot", "plot_experiment"]

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
