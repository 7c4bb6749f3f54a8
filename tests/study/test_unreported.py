"""A peer server's client-side remainder is "unreported" in the study, not "network":
Ray Serve's proxy-to-replica hop (and any framework time a peer does not report) is in it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cvserve.study import runner
from cvserve.study.plan import ServerSpec, StudyPoint


def _fake_result():
    point = SimpleNamespace(
        ok=10, errors={"total": 0, "by_status": {}, "by_kind": {}}, throughput_rps=5.0,
        latency_ms={"mean": 20.0, "p50": 19.0, "p99": 30.0}, mean_batch_size=1.0,
        breakdown_ms={"decode": 5.0, "infer": 10.0, "network": 5.0},
        breakdown_pct={"decode": 25.0, "infer": 50.0, "network": 25.0},
    )  # fmt: skip
    return SimpleNamespace(points=[point])


@pytest.mark.parametrize(("kind", "remainder"), [("ray-serve", "unreported"),
                         ("litserve", "unreported"), ("cvserve", "network"),
                         ("baseline", "network")])  # fmt: skip
def test_peer_remainder_is_unreported(monkeypatch, kind, remainder):
    import cvserve.bench

    monkeypatch.setattr(cvserve.bench, "run_bench", lambda config: _fake_result())
    ctx = SimpleNamespace(settings=SimpleNamespace(duration=1.0, warmup=0.1),
                          images=lambda which: [])  # fmt: skip
    plan = StudyPoint(id="p", labels={}, server=ServerSpec(key="k", kind=kind), target="m")
    metrics = runner._bench_point(ctx, "http://127.0.0.1:1", plan)
    assert metrics["breakdown_ms"] == {"decode": 5.0, "infer": 10.0, remainder: 5.0}
    assert metrics["breakdown_pct"][remainder] == 25.0
    other = "network" if remainder == "unreported" else "unreported"
    assert other not in metrics["breakdown_ms"]
