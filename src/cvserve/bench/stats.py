"""Numbers from samples: latency percentiles, stage breakdowns and the stability test.

Percentiles are numpy's default (linear interpolation), so anyone can recompute a summary
from the per-request rows with one numpy call and get the same digits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cvserve.trace import STAGES

PERCENTILES: tuple[int, ...] = (50, 90, 99)

__all__ = ["PERCENTILES", "breakdown", "is_stable", "latency_summary"]


def latency_summary(latencies_s: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """``mean``, ``p50``, ``p90``, ``p99``, ``min``, ``max`` in milliseconds (None if empty)."""
    lat = np.asarray(latencies_s, dtype=np.float64)
    keys = ["mean", *(f"p{p}" for p in PERCENTILES), "min", "max"]
    if lat.size == 0:
        return dict.fromkeys(keys)
    pct = np.percentile(lat, PERCENTILES)
    values = [lat.mean(), *pct, lat.min(), lat.max()]
    return {k: float(v) * 1000.0 for k, v in zip(keys, values, strict=True)}


def breakdown(
    latencies_s: np.ndarray, stages_s: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean milliseconds per stage and their share of the mean end-to-end latency (%).

    ``stages_s`` holds one array per server stage, aligned with ``latencies_s`` (a stage
    absent from a request is 0). ``network`` is what the client saw beyond the server's
    stages, so the stages and ``network`` add up to the mean latency exactly.
    """
    lat = np.asarray(latencies_s, dtype=np.float64)
    if lat.size == 0:
        return {}, {}
    server = np.zeros_like(lat)
    means: dict[str, float] = {}
    for name in STAGES:
        if name in stages_s and name != "network":
            col = np.asarray(stages_s[name], dtype=np.float64)
            server += col
            means[name] = float(col.mean())
    means["network"] = float((lat - server).mean())
    total = float(lat.mean())
    ms = {k: v * 1000.0 for k, v in means.items()}
    pct = {k: (100.0 * v / total if total > 0 else 0.0) for k, v in means.items()}
    return ms, pct


def is_stable(
    throughputs: Sequence[float], p50s: Sequence[float | None], tolerance: float, count: int = 3
) -> bool:
    """True when the last ``count`` windows agree: for throughput and for p50 latency alike,
    ``(max - min) / mean <= tolerance`` (and every window completed requests)."""
    if len(throughputs) < count or len(p50s) < count:
        return False
    for series in (throughputs[-count:], p50s[-count:]):
        if any(v is None or not v > 0 for v in series):
            return False
        values = np.asarray(series, dtype=np.float64)
        if (values.max() - values.min()) / values.mean() > tolerance:
            return False
    return True
