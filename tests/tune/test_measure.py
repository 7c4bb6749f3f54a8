"""The concurrency sweep that scores one candidate, over a fake load point."""

from __future__ import annotations

from cvserve.tune.measure import concurrency_ladder, sweep


def fake_server(capacity: float, base_ms: float, errors_from: int | None = None):
    """A closed-loop server: throughput c / latency up to ``capacity``, then queueing."""
    calls: list[int] = []

    def point(c: int) -> dict:
        calls.append(c)
        tput = min(c * 1000.0 / base_ms, capacity)
        p99 = max(base_ms, c / capacity * 1000.0) * 1.2
        errs = 1 if errors_from is not None and c >= errors_from else 0
        return {"throughput_rps": tput, "p99_ms": p99, "errors": errs}

    return point, calls


def test_ladder():
    assert concurrency_ladder(64) == [1, 2, 4, 8, 16, 32, 64]
    assert concurrency_ladder(12) == [1, 2, 4, 8, 12]
    assert concurrency_ladder(1) == [1]


def test_stops_when_throughput_stops_rising():
    point, calls = fake_server(capacity=40.0, base_ms=100.0)  # saturates at c=4
    m = sweep(point, slo_p99_ms=10_000, max_concurrency=64)
    assert calls == [1, 2, 4, 8]
    assert m.meets_slo and m.throughput_rps == 40.0 and m.concurrency == 4


def batching_server():
    """Throughput still rising with concurrency (batches fill), p99 = 12 ms x c."""
    calls: list[int] = []

    def point(c: int) -> dict:
        calls.append(c)
        return {"throughput_rps": 50.0 * c, "p99_ms": 12.0 * c, "errors": 0}

    return point, calls


def test_stops_at_the_slo_and_bisects_once():
    point, calls = batching_server()
    m = sweep(point, slo_p99_ms=120.0, max_concurrency=64)  # c <= 10
    assert calls == [1, 2, 4, 8, 16, 12]
    assert m.concurrency == 8 and m.p99_ms <= 120.0
    assert all(p["meets_slo"] == (p["p99_ms"] <= 120.0) for p in m.points)


def test_bisection_point_can_win():
    point, calls = batching_server()
    m = sweep(point, slo_p99_ms=150.0, max_concurrency=64)  # c <= 12.5
    assert calls == [1, 2, 4, 8, 16, 12]
    assert m.concurrency == 12


def test_errors_miss_the_slo():
    point, calls = fake_server(capacity=1000.0, base_ms=100.0, errors_from=4)
    m = sweep(point, slo_p99_ms=10_000, max_concurrency=64)
    assert calls == [1, 2, 4, 3]
    assert m.concurrency == 3


def test_nothing_meets_the_slo():
    point, calls = fake_server(capacity=10.0, base_ms=500.0)
    m = sweep(point, slo_p99_ms=100.0, max_concurrency=64)
    assert calls == [1] and not m.meets_slo
    assert m.throughput_rps is None and m.p99_c1_ms == 600.0
