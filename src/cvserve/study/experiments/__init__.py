"""The paper's experiments as data: what each varies, which servers it needs, and how its
numbers turn into derived values and finding sentences.

Each experiment is an :class:`Experiment` in a module of its own here: ``prepare``
measures what is not served (the DNN alone, the CPU cost of preprocessing), ``plans``
lists the load points, each with the server it needs (points that share a server run back
to back on one process), ``metrics`` adds experiment-specific numbers to a point, and
``finish`` computes ``derived`` and the findings. The runner (``study/runner.py``) does
the serving, measuring and saving.
"""

from __future__ import annotations

from cvserve.study.experiments import accelerator, broker, concurrency, image_sizes, models, setups
from cvserve.study.experiments._common import Experiment, fmt_number
from cvserve.study.plan import settings_for

__all__ = ["EXPERIMENT_DEFS", "Experiment", "fmt_number", "settings_for"]

#: Every experiment by name, in report order.
EXPERIMENT_DEFS: dict[str, Experiment] = {
    m.EXPERIMENT.name: m.EXPERIMENT
    for m in (setups, models, concurrency, image_sizes, broker, accelerator)
}
