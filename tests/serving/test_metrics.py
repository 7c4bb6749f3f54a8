"""Metrics: what observe_request and the batch hook record, read back through the
Prometheus text format with prometheus_client's own parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cvserve.serving.batcher import BatchInfo
from cvserve.serving.metrics import Metrics

# Stage times of three requests, in seconds; none sits on a bucket edge.
REQUESTS = [
    ("a", 200, {"recv": 0.00003, "decode": 0.0031, "infer": 0.012, "encode": 0.0002}),
    ("a", 200, {"recv": 0.00004, "decode": 0.0007, "infer": 0.2, "encode": 0.0003}),
    ("a", 413, {"recv": 0.00002, "encode": 0.00001}),
    ("b", 200, {"decode": 0.04, "infer": 1.7}),
]


def _families(m: Metrics) -> dict:
    text = m.render().decode("utf-8")
    return {f.name: f for f in text_string_to_metric_families(text)}


def _samples(family, suffix: str = "", **labels) -> list:
    return [
        s
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _value(family, suffix: str = "", **labels) -> float:
    (s,) = _samples(family, suffix, **labels)
    return s.value


def _buckets(family, **labels) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in _samples(family, "_bucket", **labels)}


def _check_buckets(got: dict[float, float], values: list[float]) -> None:
    """Cumulative counts, as Prometheus defines them: observations <= le, ending at +Inf."""
    assert math.inf in got and len(got) >= 8  # real buckets, not just +Inf
    assert got == {le: float(sum(v <= le for v in values)) for le in got}


@pytest.fixture
def filled() -> Metrics:
    m = Metrics()
    for model, status, stages in REQUESTS:
        m.observe_request(model, status, stages)
    return m


def test_requests_are_counted_by_model_and_status(filled):
    fams = _families(filled)
    req = fams["cvserve_requests"]
    assert req.type == "counter"
    assert _value(req, "_total", model="a", status="200") == 2
    assert _value(req, "_total", model="a", status="413") == 1
    assert _value(req, "_total", model="b", status="200") == 1
    assert len(_samples(req, "_total")) == 3  # no other label set appeared


def test_request_latency_is_the_sum_of_the_stages(filled):
    lat = _families(filled)["cvserve_request_duration_seconds"]
    assert lat.type == "histogram"
    for model in ("a", "b"):
        totals = [sum(st.values()) for mo, _, st in REQUESTS if mo == model]
        assert _value(lat, "_count", model=model) == len(totals)
        assert _value(lat, "_sum", model=model) == pytest.approx(sum(totals), rel=1e-12)
        _check_buckets(_buckets(lat, model=model), totals)


def test_every_stage_gets_its_own_histogram(filled):
    stage = _families(filled)["cvserve_stage_duration_seconds"]
    assert stage.type == "histogram"
    seen = set()
    for model in ("a", "b"):
        names = {n for mo, _, st in REQUESTS if mo == model for n in st}
        for name in names:
            values = [st[name] for mo, _, st in REQUESTS if mo == model and name in st]
            assert _value(stage, "_count", model=model, stage=name) == len(values)
            assert _value(stage, "_sum", model=model, stage=name) == pytest.approx(
                sum(values), rel=1e-12
            )
            _check_buckets(_buckets(stage, model=model, stage=name), values)
            seen.add((model, name))
    # nothing charged to a stage a request did not have
    rendered = {(s.labels["model"], s.labels["stage"]) for s in _samples(stage, "_count")}
    assert rendered == seen


def test_the_batch_hook_records_batch_sizes_per_model():
    m = Metrics()
    hook_a, hook_b = m.batch_observer("a"), m.batch_observer("b")
    sizes_a = [1, 3, 8, 8, 5, 64]
    for n in sizes_a:
        hook_a(BatchInfo(size=n, instance=0, infer_start=0.0, infer_end=0.001))
    hook_b(BatchInfo(size=2, instance=1, infer_start=0.0, infer_end=0.001, simulated=True))
    hist = _families(m)["cvserve_batch_size"]
    assert hist.type == "histogram"
    assert _value(hist, "_count", model="a") == len(sizes_a)
    assert _value(hist, "_sum", model="a") == sum(sizes_a)
    _check_buckets(_buckets(hist, model="a"), sizes_a)
    assert _value(hist, "_count", model="b") == 1 and _value(hist, "_sum", model="b") == 2


def test_gauges_render_what_was_set(filled):
    filled.queue_depth.labels("a").set(7)
    filled.busy_instances.labels("a").set(2)
    fams = _families(filled)
    assert fams["cvserve_queue_depth"].type == "gauge"
    assert _value(fams["cvserve_queue_depth"], model="a") == 7
    assert _value(fams["cvserve_busy_instances"], model="a") == 2


def test_each_instance_has_its_own_registry(filled):
    """Two apps in one process (tests, the demo) must not share counts."""
    fresh = _families(Metrics())
    assert _samples(fresh["cvserve_requests"], "_total") == []
    assert _samples(fresh["cvserve_stage_duration_seconds"], "_count") == []
    # and the filled one still has its own
    assert _value(_families(filled)["cvserve_requests"], "_total", model="b", status="200") == 1


def test_the_text_is_prometheus_exposition_format(filled):
    from cvserve.serving.metrics import CONTENT_TYPE

    # the text format, which every Prometheus scrapes (not OpenMetrics or protobuf)
    assert CONTENT_TYPE.startswith("text/plain; version=") and "charset=utf-8" in CONTENT_TYPE
    text = filled.render().decode("utf-8")
    families = list(text_string_to_metric_families(text))  # raises on a malformed line
    types = {f.name: f.type for f in families if not f.name.endswith("_created")}
    assert types == {
        "cvserve_requests": "counter",
        "cvserve_request_duration_seconds": "histogram",
        "cvserve_stage_duration_seconds": "histogram",
        "cvserve_batch_size": "histogram",
        "cvserve_queue_depth": "gauge",
        "cvserve_busy_instances": "gauge",
        "cvserve_service_rate": "gauge",
        "cvserve_expected_wait_seconds": "gauge",
        "cvserve_wait_limit_seconds": "gauge",
        "cvserve_model_memory_bytes": "gauge",
        "cvserve_edge_refusals": "counter",
        "cvserve_pipeline_step_seconds": "histogram",
        "cvserve_pipeline_step_items": "counter",
        "cvserve_pipeline_step_batch_size": "histogram",
        "cvserve_pipeline_step_expired_items": "counter",
    }
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # each family once
    # every sample line parsed into some family: none was skipped
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == sum(len(f.samples) for f in families)
