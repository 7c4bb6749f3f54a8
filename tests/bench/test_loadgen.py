"""Open-loop arrivals are Poisson: exponential inter-arrival times (Kolmogorov-Smirnov),
seeded, scheduled on absolute times."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.point import poisson_arrivals


def ks_exponential(samples: np.ndarray, rate: float) -> tuple[float, float]:
    """One-sample KS statistic against Exp(rate) and its p-value (Kolmogorov distribution,
    with Stephens' small-sample correction)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    cdf = 1.0 - np.exp(-rate * x)
    d = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    t = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k**2 * t**2))
    return float(d), float(min(max(p, 0.0), 1.0))


def test_inter_arrivals_are_exponential():
    rate = 250.0
    arrivals = poisson_arrivals(rate, [42, 0], 5000)
    gaps = np.diff(arrivals, prepend=0.0)
    assert (gaps > 0).all()
    _, p = ks_exponential(gaps, rate)
    assert p > 0.01
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)


def test_ks_has_power():
    """The same check rejects evenly spaced and wrongly-rated arrivals."""
    rate = 250.0
    assert ks_exponential(np.full(2000, 1 / rate), rate)[1] < 1e-6
    gaps = np.diff(poisson_arrivals(2 * rate, 1, 2000), prepend=0.0)
    assert ks_exponential(gaps, rate)[1] < 1e-6


def test_ks_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    gaps = np.diff(poisson_arrivals(100.0, 3, 3000), prepend=0.0)
    d, p = ks_exponential(gaps, 100.0)
    ref = stats.kstest(gaps, "expon", args=(0, 1 / 100.0))
    assert d == pytest.approx(ref.statistic, rel=1e-9)
    assert p == pytest.approx(ref.pvalue, abs=0.02)


def test_seeded_and_chunk_independent():
    a = poisson_arrivals(50.0, [1, 2], 10_000)
    assert np.array_equal(a, poisson_arrivals(50.0, [1, 2], 10_000))
    assert np.array_equal(a[:100], poisson_arrivals(50.0, [1, 2], 100))
    assert not np.array_equal(a[:100], poisson_arrivals(50.0, [1, 3], 100))


def test_open_loop_sends_on_the_schedule(fake_url, tiny_images):
    """Every request's start (its intended send time) is a scheduled Poisson arrival, so
    latency counts any delay in sending; the sent gaps pass the same KS test."""
    rate, seed = 400.0, 7
    cfg = BenchConfig(
        url=fake_url, model="echo", images=tiny_images, rates=[rate], warmup=0.1,
        requests=300, seed=seed,
    )  # fmt: skip
    result = run_bench(cfg)
    (point,) = result.points
    assert point.requests == 300 and point.errors["total"] == 0 and point.dropped == 0
    assert point.offered_rps is not None
    # the sender's delay, measured (an arrival is never sent before its time)
    assert point.send_lag_ms["max"] >= point.send_lag_ms["mean"] > 0
    starts = np.sort(result.rows["start"] - point.started_s)
    schedule = poisson_arrivals(rate, [seed, point.index], 4 * starts.size)
    idx = np.searchsorted(schedule, starts - 1e-9)
    assert np.allclose(schedule[idx], starts, atol=1e-9, rtol=0)
    # every scheduled arrival up to the last one sent was sent (none lost, none dropped)
    assert np.array_equal(idx, np.arange(idx.size)) or point.unfinished > 0
    _, p = ks_exponential(np.diff(starts, prepend=0.0), rate)
    assert p > 0.001
