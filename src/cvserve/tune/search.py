"""The search: coordinate descent over one knob at a time, from the defaults, in a budget.

The knobs, in the order they are searched (the order in which they matter most on a CPU):

1. ``instances``: model instances, trading threads for instances at the same DNN cores
   (``instances * intra_op_threads`` is kept, and never exceeds the cores);
2. ``max_batch``: 1, 2, 4, ... 64;
3. ``max_delay_ms``: 0, 1, 2, 5, 10, 20, 50, 100;
4. ``intra_op_threads``: 1 .. cores / instances (fewer leave cores to preprocessing);
5. ``preprocess_threads``: 1, 2, 4, ... up to twice the cores;
6. ``decoder``: the reduced-scale decoders (``pil-reduced``, ``simplejpeg``, ``opencv``);
   ``pil`` always decodes at full size, never less work, so it is not tried.

For an ordered knob the search steps up the ladder from the current value while each step
beats the best so far by more than ``min_gain`` (noise), then, if up never helped, down
the same way: a direction stops at the first step that does not improve. The decoder is
categorical: every other choice is tried once. A pass over all knobs repeats while the
previous one improved something (at most ``max_passes``). A setting measured once is
never measured again (in this run, or in an earlier one, through the state file).

Candidates compare by :func:`better`: one that meets the SLO beats one that does not, two
that meet it compare by throughput, two that miss it by their p99 at concurrency 1 (lower
is closer to meeting it), so that a search from defaults that miss the SLO moves toward
settings that meet it.

The defaults are measured first whatever the budget (the gain is a ratio against them).
After that, a candidate is started only if the longest measurement so far fits in the
time left; when one does not, the search stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvserve.bench.point import OnProgress

log = logging.getLogger(__name__)

#: Decoders the search tries (``pil`` decodes at full size: never less work).
DECODERS: tuple[str, ...] = ("pil-reduced", "simplejpeg", "opencv")
BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
DELAYS_MS: tuple[float, ...] = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
#: The knobs in search order (see the module docstring).
KNOBS: tuple[str, ...] = (
    "instances", "max_batch", "max_delay_ms", "intra_op_threads", "preprocess_threads",
    "decoder",
)  # fmt: skip
#: How a move along each knob is named in tables (``batch up``).
SHORT: dict[str, str] = {
    "instances": "instances", "max_batch": "batch", "max_delay_ms": "delay",
    "intra_op_threads": "threads", "preprocess_threads": "prep", "decoder": "decoder",
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """One candidate: the server settings the search varies (all resolved, none ``0``)."""

    max_batch: int
    max_delay_ms: float
    instances: int
    intra_op_threads: int
    preprocess_threads: int
    decoder: str

    @classmethod
    def defaults(cls, cores: int) -> Settings:
        """What ``cvserve serve --model M`` runs with on ``cores`` cores."""
        from cvserve.config import BatchConfig, ModelConfig

        b, m = BatchConfig(), ModelConfig(name="-")
        return cls(
            max_batch=b.max_batch_size,
            max_delay_ms=float(b.max_delay_ms),
            instances=b.instances,
            intra_op_threads=max(1, cores // b.instances),  # ModelConfig's 0
            preprocess_threads=cores,  # ServerConfig's 0
            decoder=m.decoder,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(
            max_batch=int(d["max_batch"]),
            max_delay_ms=float(d["max_delay_ms"]),
            instances=int(d["instances"]),
            intra_op_threads=int(d["intra_op_threads"]),
            preprocess_threads=int(d["preprocess_threads"]),
            decoder=str(d["decoder"]),
        )

    def label(self) -> str:
        return (
            f"batch {self.max_batch}, delay {self.max_delay_ms:g} ms, {self.instances}x"
            f"{self.intra_op_threads} threads, prep {self.preprocess_threads}, {self.decoder}"
        )


@dataclass
class Measurement:
    """What one candidate measured: its best point that met the SLO (None: none did)."""

    #: Every load point: concurrency, throughput_rps, p50_ms, p99_ms, errors, meets_slo ...
    points: list[dict[str, Any]] = field(default_factory=list)
    throughput_rps: float | None = None
    p99_ms: float | None = None
    concurrency: int | None = None
    #: Wall time of the whole measurement, server start-up included.
    wall_s: float = 0.0
    #: Why it could not be measured (server did not start ...), else None.
    error: str | None = None

    @property
    def meets_slo(self) -> bool:
        return self.throughput_rps is not None

    @property
    def p99_c1_ms(self) -> float | None:
        """The p99 of the lowest concurrency measured (how far from the SLO a miss is)."""
        pts = [p for p in self.points if p.get("p99_ms") is not None]
        return min(pts, key=lambda p: p["concurrency"])["p99_ms"] if pts else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurement:
        return cls(**{k: d.get(k) for k in ("throughput_rps", "p99_ms", "concurrency", "error")},
                   points=list(d.get("points") or []), wall_s=float(d.get("wall_s") or 0.0))  # fmt: skip


def better(a: Measurement, b: Measurement | None, min_gain: float = 0.0) -> bool:
    """Whether ``a`` beats ``b`` by more than ``min_gain`` (a fraction)."""
    if b is None:
        return True
    if a.meets_slo != b.meets_slo:
        return a.meets_slo
    if a.meets_slo:
        return a.throughput_rps > b.throughput_rps * (1.0 + min_gain)  # type: ignore[operator]
    pa, pb = a.p99_c1_ms, b.p99_c1_ms
    if pa is None or pb is None:
        return pa is not None
    return pa < pb * (1.0 - min_gain)


@dataclass
class Candidate:
    """One candidate of this run: its settings, how the search got there, its result."""

    settings: Settings
    #: ``default``, or the move that proposed it (``batch up``, ``decoder opencv``).
    move: str
    measurement: Measurement
    #: Measured by an earlier run (the state file), not again now.
    reused: bool = False


@dataclass
class SearchResult:
    candidates: list[Candidate]
    best: Candidate
    default: Candidate
    #: Why the search ended: ``converged``, ``budget`` or ``passes``.
    stop_reason: str

    @property
    def winner(self) -> Candidate | None:
        """The best candidate, if it meets the SLO."""
        return self.best if self.best.measurement.meets_slo else None


def _ladder(start: int, stop: int) -> list[int]:
    """1, 2, 4 ... up to ``stop``, and ``stop`` itself; from ``start``."""
    out, v = [], 1
    while v < stop:
        out.append(v)
        v *= 2
    out.append(stop)
    return [v for v in out if v >= start]


def ladder(knob: str, s: Settings, cores: int) -> list[Any]:
    """The values ``knob`` may take from ``s``, in order (ordered knobs only)."""
    if knob == "instances":
        return _ladder(1, cores)
    if knob == "max_batch":
        return list(BATCHES)
    if knob == "max_delay_ms":
        return list(DELAYS_MS)
    if knob == "intra_op_threads":
        top = max(1, cores // s.instances)
        return list(range(1, top + 1)) if top <= 8 else _ladder(1, top)
    if knob == "preprocess_threads":
        return _ladder(1, 2 * cores)
    raise ValueError(f"not an ordered knob: {knob}")


def with_value(knob: str, s: Settings, value: Any, cores: int) -> Settings | None:
    """``s`` with ``knob`` at ``value``, adjusted to fit the cores; None if it cannot."""
    if knob == "instances":
        if value > cores:
            return None
        # the same cores for the DNN, split over more or fewer instances
        threads = max(1, min(cores // value, (s.instances * s.intra_op_threads) // value))
        return replace(s, instances=value, intra_op_threads=threads)
    new = replace(s, **{knob: value})
    if new.instances * new.intra_op_threads > cores:
        return None
    return new


def proposals(knob: str, s: Settings, cores: int, direction: int) -> Iterator[Settings]:
    """The settings one step, two steps ... from ``s`` along ``knob`` in ``direction``."""
    value = getattr(s, knob)
    values = ladder(knob, s, cores)
    steps = (
        [v for v in values if v > value]
        if direction > 0
        else [v for v in values if v < value][::-1]
    )
    for v in steps:
        new = with_value(knob, s, v, cores)
        if new is not None and new != s:
            yield new


Measure = Callable[[Settings], Measurement]


class Search:
    """Coordinate descent (see the module docstring) over ``measure``'s results.

    ``measure`` takes a Settings and returns a Measurement; ``known`` holds measurements
    of earlier runs (reused, not measured again); ``clock`` and the budget are in seconds.
    """

    def __init__(
        self,
        measure: Measure,
        cores: int,
        budget_s: float,
        *,
        known: dict[Settings, Measurement] | None = None,
        decoders: tuple[str, ...] = DECODERS,
        knobs: tuple[str, ...] = KNOBS,
        min_gain: float = 0.03,
        max_passes: int = 3,
        start: Settings | None = None,
        first_estimate_s: float = 0.0,
        on_candidate: Callable[[Candidate], None] | None = None,
        progress: OnProgress | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.measure = measure
        self.cores = cores
        self.budget_s = budget_s
        self.known = dict(known or {})
        self.decoders = decoders
        self.knobs = knobs
        self.min_gain = min_gain
        self.max_passes = max_passes
        self.start = start or Settings.defaults(cores)
        self.first_estimate_s = first_estimate_s
        self.on_candidate = on_candidate or (lambda c: None)
        self.progress = progress or (lambda e: None)
        self.clock = clock
        self.candidates: list[Candidate] = []
        self._seen: dict[Settings, Candidate] = {}
        self._longest = 0.0  # the longest measurement of this run
        self._out_of_budget = False

    # --- budget --------------------------------------------------------------------------
    def estimate_s(self) -> float:
        """What the next measurement is expected to take: the longest one so far."""
        return self._longest or self.first_estimate_s

    def time_left(self) -> float:
        return self.budget_s - (self.clock() - self.t0)

    # --- candidates ----------------------------------------------------------------------
    def best(self) -> Candidate | None:
        best = None
        for c in self.candidates:
            if best is None or better(c.measurement, best.measurement):
                best = c
        return best

    def _event(self, kind: str, **extra: Any) -> None:
        best = self.best()
        self.progress({
            "event": kind, "done": len(self.candidates), "time_left_s": self.time_left(),
            "budget_s": self.budget_s, "best": None if best is None else best.measurement,
            "best_settings": None if best is None else best.settings, **extra,
        })  # fmt: skip

    def evaluate(self, s: Settings, move: str, force: bool = False) -> Candidate | None:
        """``s``'s candidate: from this run, an earlier one, or measured now; None when
        it does not fit in the budget (unless ``force``)."""
        if s in self._seen:
            return self._seen[s]
        if s in self.known:
            c = Candidate(s, move, self.known[s], reused=True)
            # what it took then is the best guess of what the next one takes now
            self._longest = max(self._longest, c.measurement.wall_s)
        else:
            if not force and self.estimate_s() > self.time_left():
                log.info("%s: not started, %.0f s expected, %.0f s left",
                         s.label(), self.estimate_s(), self.time_left())  # fmt: skip
                self._out_of_budget = True
                return None
            self._event("candidate", settings=s, move=move, expected_s=self.estimate_s())
            t = self.clock()
            m = self.measure(s)
            m.wall_s = m.wall_s or self.clock() - t
            self._longest = max(self._longest, m.wall_s)
            c = Candidate(s, move, m)
        self._seen[s] = c
        self.candidates.append(c)
        self.on_candidate(c)
        self._event("done", candidate=c)
        return c

    # --- the descent ---------------------------------------------------------------------
    def _walk(self, knob: str, current: Candidate) -> Candidate:
        """Step along one ordered knob while it improves; up first, then down."""
        for direction, word in ((1, "up"), (-1, "down")):
            moved = False
            base = current.settings
            for s in proposals(knob, base, self.cores, direction):
                c = self.evaluate(s, f"{SHORT[knob]} {word}")
                if c is None or not better(c.measurement, current.measurement, self.min_gain):
                    break
                current, moved = c, True
            if moved or self._out_of_budget:
                break
        return current

    def _pick_decoder(self, current: Candidate) -> Candidate:
        best = current
        for d in self.decoders:
            if d == current.settings.decoder:
                continue
            c = self.evaluate(replace(current.settings, decoder=d), f"decoder {d}")
            if c is None:
                break
            if better(c.measurement, best.measurement, self.min_gain):
                best = c
        return best

    def run(self) -> SearchResult:
        self.t0 = self.clock()
        default = self.evaluate(self.start, "default", force=True)
        assert default is not None
        current = default
        passes, reason = 0, "converged"
        while True:
            passes += 1
            before = current
            for knob in self.knobs:
                if self._out_of_budget:
                    break
                if knob == "decoder":
                    current = self._pick_decoder(current)
                else:
                    current = self._walk(knob, current)
            if self._out_of_budget:
                reason = "budget"
                break
            if current is before:
                break
            if passes >= self.max_passes:
                reason = "passes"
                break
        best = self.best()
        assert best is not None
        self._event("end", stop_reason=reason)
        return SearchResult(self.candidates, best, default, reason)
