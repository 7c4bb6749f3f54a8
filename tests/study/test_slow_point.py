"""A study point slower than its window: measured by count, not reported as a failure."""

from __future__ import annotations

from types import SimpleNamespace

from cvserve.bench import BenchImage
from cvserve.bench.fake import serve_in_thread
from cvserve.study.plan import StudyPoint
from cvserve.study.runner import _bench_point


def test_a_point_whose_first_answer_comes_after_the_window_is_measured_by_count():
    images = [BenchImage("a.jpg", b"\xff\xd8\xff" + bytes(100), "image/jpeg")]
    # each answer takes 1 s; the window is 0.2 s after a 0.05 s warm-up, so no answer
    # lands in it (as the baseline on large photos does in --quick on a busy machine)
    ctx = SimpleNamespace(
        settings=SimpleNamespace(duration=0.2, warmup=0.05), images=lambda name: images
    )
    plan = StudyPoint(id="slow", labels={}, server=None, target="echo", concurrency=2)
    with serve_in_thread(delay=1.0) as url:
        metrics = _bench_point(ctx, url, plan)
    assert metrics["errors"] == 0
    assert metrics["requests"] >= plan.concurrency
    assert metrics["throughput_rps"] > 0
    assert metrics["mean_ms"] >= 1000.0  # what one request costs, not "nothing"
