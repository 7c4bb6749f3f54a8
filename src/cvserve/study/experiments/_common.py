"""What every experiment shares: the :class:`Experiment` record, rounding and finding
sentences, stage shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cvserve.study.plan import ServerSpec, StudyPoint, StudySettings
from cvserve.study.results import ExperimentResult, Finding

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext

PRE = ("decode", "resize", "normalize")
QUEUE = ("queue", "batch_wait")


@dataclass
class Experiment:
    name: str
    title: str
    paper: dict[str, str]
    plans: Callable[[StudyContext, ExperimentResult], list[StudyPoint]]
    finish: Callable[[StudyContext, ExperimentResult], None]
    prepare: Callable[[StudyContext, ExperimentResult], None] | None = None
    metrics: Callable[[StudyPoint, dict[str, Any], StudyContext, ExperimentResult], None] | None = (
        None
    )
    params: Callable[[StudySettings], dict[str, Any]] = field(default=lambda s: {})


# --- shared arithmetic --------------------------------------------------------------------
def rounded(value: float, digits: int = 1) -> float:
    """Round for a sentence; the finding stores exactly what the sentence prints."""
    return round(float(value), digits)


def finding(
    fid: str, template: str, words: dict[str, str] | None = None, **values: float
) -> Finding:
    """A sentence from ``template``: ``values`` (numbers, printed with ``:g`` and stored in
    the finding, so each printed number can be checked against the JSON) and ``words``."""
    text = template.format(**(words or {}), **{k: fmt_number(v) for k, v in values.items()})
    return Finding(fid, text, dict(values))


def fmt_number(value: float) -> str:
    """How a finding prints a number: as rounded, thousands separated past 9,999."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:g}"


def stage_sum(bd: dict[str, float], stages: tuple[str, ...]) -> float:
    return sum(bd.get(s, 0.0) for s in stages)


def share(metrics: dict[str, Any], stages: tuple[str, ...]) -> float:
    """Percent of mean latency spent in ``stages``."""
    mean = metrics.get("mean_ms") or 0.0
    return 100.0 * stage_sum(metrics.get("breakdown_ms", {}), stages) / mean if mean else 0.0


#: The study measures queueing as the paper did: requests wait instead of being refused
#: for the time they are expected to wait (cvserve's default refuses those with a 429).
QUEUE_ALL = ("--max-queue-wait-ms", "0")


def model_server(key: str, model: str, *extra: str) -> ServerSpec:
    return ServerSpec(key=key, args=("--model", model, *QUEUE_ALL, *extra))
