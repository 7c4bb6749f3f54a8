"""Per-request stage timing: one vocabulary (DESIGN.md) for traces, Server-Timing and results.

A :class:`Trace` is a chain of contiguous stages: each ``mark(stage)`` charges the time since
the previous mark to ``stage``, so the stages of a request add up to the server's total time
for it, with nothing double-counted and nothing hidden.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

#: Where a long step tells its progress: one line of text per call (``print``,
#: ``log.info``, a console's status line). The event-style callback of the load generator
#: is another thing (``bench.point.OnProgress``).
Say = Callable[[str], None]

#: Every stage name cvserve emits, in request order (DESIGN.md, "Stage names").
STAGES: tuple[str, ...] = (
    "recv",
    "queue",
    "decode",
    "resize",
    "normalize",
    "batch_wait",
    "h2d",
    "infer",
    "d2h",
    "postprocess",
    "broker",
    "encode",
    "network",
)
SERVER_STAGES: tuple[str, ...] = tuple(s for s in STAGES if s != "network")
_KNOWN = frozenset(STAGES)

__all__ = [
    "STAGES",
    "SERVER_STAGES",
    "Trace",
    "format_server_timing",
    "parse_server_timing",
    "server_timing_simulated",
]

#: Server-Timing parameter on the ``infer`` entry of a response whose inference ran on the
#: simulated accelerator (``infer;dur=1.234;sim=1``): the numbers are not a real DNN's.
SIMULATED_PARAM = "sim"


class Trace:
    """Stage durations of one request, in seconds, measured with ``time.perf_counter``.

    ``simulated`` is set when the request's inference ran on the simulated accelerator;
    its Server-Timing then flags the ``infer`` entry with ``sim=1``."""

    __slots__ = ("start", "last", "stages", "simulated", "steps")

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.last = self.start
        self.stages: dict[str, float] = {}
        self.simulated = False
        #: stage -> {pipeline step: seconds}: which step of a pipeline the time went to
        self.steps: dict[str, dict[str, float]] = {}

    def note_step(self, step: str, stages: Mapping[str, float]) -> None:
        """Record that ``step`` of a pipeline spent ``stages`` (already charged with
        :meth:`add`): Server-Timing names it in each stage's ``desc``."""
        for stage, seconds in stages.items():
            if stage in _KNOWN and seconds > 0:
                per = self.steps.setdefault(stage, {})
                per[step] = per.get(step, 0.0) + seconds

    def add(self, stage: str, seconds: float) -> None:
        """Charge ``seconds`` to ``stage`` (a stage may be charged more than once)."""
        if stage not in _KNOWN:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        self.stages[stage] = self.stages.get(stage, 0.0) + max(0.0, seconds)

    def mark(self, stage: str, now: float | None = None) -> float:
        """Charge the time since the previous mark to ``stage``; returns ``now``."""
        now = time.perf_counter() if now is None else now
        self.add(stage, now - self.last)
        self.last = now
        return now

    def advance(self, now: float) -> None:
        """Move the mark without charging (the time was charged by :meth:`add` already)."""
        self.last = max(self.last, now)

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def server_timing(self) -> str:
        return format_server_timing(self.stages, simulated=self.simulated, steps=self.steps)


def format_server_timing(
    stages: Mapping[str, float],
    simulated: bool = False,
    steps: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """Encode stage durations (seconds) as a ``Server-Timing`` header value (milliseconds).

    ``simulated`` adds ``sim=1`` to the ``infer`` entry (see :func:`server_timing_simulated`).
    ``steps`` (a pipeline's): a stage's time per step, as its ``desc``
    (``infer;dur=9.1;desc="detect=3.0 classify=6.1"``).
    """
    flag = f";{SIMULATED_PARAM}=1" if simulated else ""

    def desc(name: str) -> str:
        per = (steps or {}).get(name)
        if not per:
            return ""
        return ';desc="' + " ".join(f"{s}={v * 1000.0:.3f}" for s, v in per.items()) + '"'

    return ", ".join(
        f"{name};dur={seconds * 1000.0:.3f}{flag if name == 'infer' else ''}{desc(name)}"
        for name, seconds in stages.items()
    )


def server_timing_simulated(value: str | bytes | None) -> bool:
    """True when a ``Server-Timing`` value says its inference was simulated (``sim=1``)."""
    if not value:
        return False
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for entry in value.split(","):
        for param in entry.split(";")[1:]:
            key, _, val = param.partition("=")
            if key.strip().lower() == SIMULATED_PARAM and val.strip().strip('"') == "1":
                return True
    return False


def parse_server_timing(value: str | None) -> tuple[dict[str, float], int]:
    """Decode a ``Server-Timing`` value into ``({stage: seconds}, malformed_count)``.

    Unknown names and malformed entries are skipped and counted, never raised: a client
    must survive any server's header.
    """
    stages: dict[str, float] = {}
    bad = 0
    if not value:
        return stages, bad
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, *params = (p.strip() for p in entry.split(";"))
        dur = None
        for p in params:
            key, _, val = p.partition("=")
            if key.strip().lower() == "dur":
                try:
                    dur = float(val.strip().strip('"'))
                except ValueError:
                    dur = None
        if name not in _KNOWN or dur is None or not math.isfinite(dur) or dur < 0:
            bad += 1
            continue
        stages[name] = stages.get(name, 0.0) + dur / 1000.0
    return stages, bad
