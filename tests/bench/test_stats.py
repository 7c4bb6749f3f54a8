"""Summary numbers against numpy on the same samples."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.bench.stats import breakdown, is_stable, latency_summary


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_latency_summary_equals_numpy(n):
    rng = np.random.default_rng(n)
    lat = rng.lognormal(-5, 1, n)
    got = latency_summary(list(lat))
    ref = np.percentile(lat, [50, 90, 99])
    assert got["mean"] == pytest.approx(np.mean(lat) * 1000, rel=1e-12)
    assert got["p50"] == pytest.approx(ref[0] * 1000, rel=1e-12)
    assert got["p90"] == pytest.approx(ref[1] * 1000, rel=1e-12)
    assert got["p99"] == pytest.approx(ref[2] * 1000, rel=1e-12)
    assert got["min"] == pytest.approx(lat.min() * 1000, rel=1e-12)
    assert got["max"] == pytest.approx(lat.max() * 1000, rel=1e-12)


def test_latency_summary_empty_is_none():
    assert set(latency_summary([]).values()) == {None}


def test_breakdown_adds_up_to_end_to_end():
    rng = np.random.default_rng(0)
    n = 500
    stages = {"decode": rng.uniform(0, 0.01, n), "infer": rng.uniform(0, 0.02, n)}
    stages["queue"] = np.where(np.arange(n) % 2 == 0, 0.0, 0.003)  # absent half the time
    lat = stages["decode"] + stages["infer"] + stages["queue"] + rng.uniform(0, 0.001, n)
    ms, pct = breakdown(lat, stages)
    assert list(ms) == ["queue", "decode", "infer", "network"]  # trace.STAGES order
    assert ms["decode"] == pytest.approx(stages["decode"].mean() * 1000)
    assert ms["network"] == pytest.approx(
        (lat - stages["decode"] - stages["infer"] - stages["queue"]).mean() * 1000
    )
    assert sum(ms.values()) == pytest.approx(lat.mean() * 1000)
    assert sum(pct.values()) == pytest.approx(100.0)
    assert breakdown(np.array([]), {}) == ({}, {})


def test_is_stable():
    assert is_stable([100, 104, 98], [10.0, 10.5, 9.8], 0.1)
    assert not is_stable([100, 104], [10.0, 10.5], 0.1)  # too few windows
    assert not is_stable([100, 130, 98], [10.0, 10.5, 9.8], 0.1)  # throughput moved
    assert not is_stable([100, 104, 98], [10.0, 14.0, 9.8], 0.1)  # p50 moved
    assert not is_stable([100, 104, 98], [10.0, None, 9.8], 0.1)  # an empty window
    assert not is_stable([0, 0, 0], [1.0, 1.0, 1.0], 0.1)
    assert is_stable([50, 100, 104, 98], [99, 10.0, 10.5, 9.8], 0.1)  # only the last three
