"""One load point as data: the settings every point of a run shares, one point's plan
(closed or open loop, stop rule), its Poisson arrival schedule, and what it recorded.
The loop that runs a point is :mod:`cvserve.bench.loadgen`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np

__all__ = [
    "Arrivals",
    "LoadSettings",
    "OnProgress",
    "PointPlan",
    "PointRecords",
    "Window",
    "poisson_arrivals",
]

_CHUNK = 4096  # arrivals drawn at a time


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """How every point of a run loads the server and when it stops: the settings
    :class:`~cvserve.bench.runner.BenchConfig` and :class:`PointPlan` share (both are
    ``LoadSettings``, so a setting is declared once).

    Stop rule, after ``warmup`` seconds: ``requests`` measured requests if set (at most
    ``max_duration`` seconds), else ``duration`` seconds if set, else once three
    consecutive windows agree within ``tolerance`` (or, unstable, after ``max_duration``).
    """

    warmup: float = 1.0
    duration: float | None = None
    requests: int | None = None
    window: float = 2.0
    tolerance: float = 0.1
    max_duration: float = 30.0
    timeout: float = 30.0
    max_in_flight: int = 4096
    honor_retry_after: bool = True
    seed: int = 0

    def load_settings(self, **changes: Any) -> LoadSettings:
        """These settings alone (``changes`` applied), as a plain :class:`LoadSettings`."""
        values = {f.name: getattr(self, f.name) for f in fields(LoadSettings)}
        return LoadSettings(**{**values, **changes})


@dataclass(frozen=True)
class PointPlan(LoadSettings):
    """How to load one point: its :class:`LoadSettings` and exactly one of
    ``concurrency`` (closed loop) and ``rate`` (open loop, Poisson arrivals per second)."""

    index: int
    concurrency: int | None = None
    rate: float | None = None

    @property
    def mode(self) -> Literal["closed", "open"]:
        return "closed" if self.concurrency is not None else "open"

    @property
    def stop_rule(self) -> Literal["requests", "duration", "stability"]:
        if self.requests is not None:
            return "requests"
        return "duration" if self.duration is not None else "stability"

    @property
    def expected_seconds(self) -> float:
        """Upper bound of the point's length, for progress bars."""
        body = self.duration if self.stop_rule == "duration" else self.max_duration
        return self.warmup + body  # type: ignore[operator]


@dataclass
class Window:
    start: float  # seconds from the point's start
    seconds: float
    completed: int
    ok: int
    throughput_rps: float
    p50_ms: float | None


@dataclass
class PointRecords:
    """What one point measured, raw: one entry per finished request, in completion order."""

    plan: PointPlan
    t_start: float  # perf_counter at the point's start
    t0: np.ndarray  # intended send time (perf_counter)
    t1: np.ndarray  # completion (or failure) time
    status: np.ndarray  # HTTP status, 0 when none
    error: np.ndarray  # 0, or 1 + index into _http.ERROR_KINDS
    batch: np.ndarray  # batch_size from the body, -1 when absent
    image: np.ndarray  # index into the image list
    nbytes: np.ndarray  # response body bytes, -1 when no response
    timing: list[bytes | None]  # raw Server-Timing values
    windows: list[Window]
    measure_start: float  # perf_counter bounds of the measured interval [start, end)
    measure_end: float
    stop_reason: str
    stable: bool | None
    dropped: int  # open loop: arrivals refused by max_in_flight, during the measured interval
    dropped_total: int
    offered: int  # open loop: arrivals scheduled during the measured interval
    unfinished: int  # requests still in flight when the point stopped (not counted)
    send_lag: tuple[float, float] | None  # open loop: (mean, max) s an arrival was sent late
    warnings: list[str] = field(default_factory=list)
    #: closed loop: seconds clients waited a 429's Retry-After before sending again, for
    #: the 429s answered in the measured interval (0 when Retry-After is not honoured)
    retry_wait_s: float = 0.0

    @property
    def measured(self) -> np.ndarray:
        return (self.t1 >= self.measure_start) & (self.t1 < self.measure_end)


class Arrivals:
    """Poisson arrival offsets (seconds from the start) at ``rate`` per second, seeded."""

    def __init__(self, rate: float, seed: int | Sequence[int]) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self._rng = np.random.default_rng(seed)
        self._scale = 1.0 / rate
        self._last = 0.0

    def chunk(self, n: int = _CHUNK) -> np.ndarray:
        out = self._last + np.cumsum(self._rng.exponential(self._scale, n))
        self._last = float(out[-1])
        return out


def poisson_arrivals(rate: float, seed: int | Sequence[int], n: int) -> np.ndarray:
    """The first ``n`` arrival offsets the open loop schedules for ``rate`` and ``seed``."""
    gen = Arrivals(rate, seed)
    return np.concatenate([gen.chunk() for _ in range(-(-n // _CHUNK))])[:n]


#: A progress callback: gets events, dicts with an ``"event"`` key (bench, study, tune).
OnProgress = Callable[[dict[str, Any]], None]
