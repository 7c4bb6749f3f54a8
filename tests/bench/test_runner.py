"""run_bench against a real (fake) server on a free port: sweeps, errors, results, plots."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

import cvserve.bench as bench
from cvserve.bench import (
    BenchConfig,
    BenchError,
    ProgressReporter,
    ResultError,
    ServerUnreachable,
    TargetNotServed,
    breakdown_table,
    load_result,
    report,
    run_bench,
    save_result,
    summary_table,
    validate,
)
from cvserve.bench.results import RESULT_SCHEMA, SCHEMA_VERSION
from cvserve.trace import STAGES

QUICK = dict(warmup=0.1, window=0.25)


@pytest.fixture(scope="module")
def sweep(fake_url, small_images, tmp_path_factory):
    cfg = BenchConfig(
        url=fake_url, model="echo", images=small_images, concurrency=[1, 3], duration=0.6,
        label="sweep", **QUICK,
    )  # fmt: skip
    events = []
    result = run_bench(cfg, progress=events.append, command=["cvserve", "bench"])
    path = save_result(result, tmp_path_factory.mktemp("results") / "sweep")
    return result, path, events


def test_public_names():
    assert sorted(bench.__all__) == sorted(
        [
            "SCHEMA_VERSION", "BenchConfig", "BenchError", "BenchImage", "BenchInterrupted",
            "BenchResult",
            "ImageSourceError", "TargetNotServed", "PointSummary", "ProgressReporter",
            "ResultError", "ServerUnreachable", "breakdown_table", "load_images", "load_result",
            "report", "run_bench", "save_result", "summary_table", "validate",
        ]
    )  # fmt: skip


def test_sweep_completes_without_errors(sweep):
    result, _, _ = sweep
    assert [(p.mode, p.concurrency) for p in result.points] == [("closed", 1), ("closed", 3)]
    for p in result.points:
        assert p.errors == {"total": 0, "by_status": {}, "by_kind": {}}
        assert p.ok == p.requests > 0 and p.stop_reason == "duration" and p.stable is None
        assert p.server_timing_malformed == 0 and p.server_timing_missing == 0
        assert p.send_lag_ms is None and p.offered_rps is None  # open loop only
        assert set(p.breakdown_ms) <= set(STAGES) and "network" in p.breakdown_ms
        assert set(p.breakdown_ms) == set(p.breakdown_pct)
        assert sum(p.breakdown_ms.values()) == pytest.approx(p.latency_ms["mean"])
    assert result.config["images"][0]["bytes"] > 0
    assert result.machine["cores"] >= 1 and result.machine["versions"]["numpy"]
    assert result.server["models"]["models"][0]["name"] == "echo"


def test_summary_equals_numpy_on_the_rows(sweep):
    result, _, _ = sweep
    rows = result.rows
    assert {k for k in rows if k.startswith("stage_")} <= {f"stage_{s}" for s in STAGES}
    for p in result.points:
        sel = (rows["point"] == p.index) & rows["measured"]
        ok = sel & (rows["status"] == 200)
        lat = rows["latency"][ok]
        assert lat.size == p.ok == p.requests
        ref = np.percentile(lat, [50, 90, 99]) * 1000
        assert [p.latency_ms[k] for k in ("p50", "p90", "p99")] == pytest.approx(ref)
        assert p.latency_ms["mean"] == pytest.approx(lat.mean() * 1000)
        assert p.latency_ms["max"] == pytest.approx(lat.max() * 1000)
        assert p.throughput_rps == pytest.approx(lat.size / p.measure_s)
        assert p.mean_batch_size == pytest.approx(rows["batch_size"][ok].mean())
        assert 1 <= p.mean_batch_size <= 4  # the fake's batch sizes
        for stage, ms in p.breakdown_ms.items():
            assert ms == pytest.approx(rows[f"stage_{stage}"][ok].mean() * 1000)
        assert (rows["window"][sel] >= 0).all()
        assert (rows["window"][(rows["point"] == p.index) & ~rows["measured"]] != 0).all()


def test_result_files_validate_and_load(sweep):
    result, path, _ = sweep
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA_VERSION and validate(doc) == []
    assert doc["command"] == ["cvserve", "bench"] and doc["label"] == "sweep"
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, RESULT_SCHEMA)  # the schema is real JSON Schema

    with np.load(path.with_suffix(".npz"), allow_pickle=False) as npz:
        assert set(npz.files) == set(result.rows) == set(doc["rows"]["columns"])
        assert all(npz[k].dtype != object for k in npz.files)
        assert all(len(npz[k]) == doc["rows"]["count"] for k in npz.files)
    loaded = load_result(path)
    assert loaded.points == result.points
    assert all(np.array_equal(loaded.rows[k], v, equal_nan=True) for k, v in result.rows.items())


def test_bad_result_files(sweep, tmp_path):
    _, path, _ = sweep
    doc = json.loads(path.read_text())
    doc["schema"] = "cvserve.bench/0"
    (tmp_path / "old.json").write_text(json.dumps(doc))
    with pytest.raises(ResultError, match="schema 'cvserve.bench/0'"):
        load_result(tmp_path / "old.json")
    doc = json.loads(path.read_text())
    doc["points"][0]["ok"] = -1
    doc["points"][0]["surprise"] = 1
    problems = validate(doc)
    assert any("ok" in p and "minimum" in p for p in problems)
    assert any("surprise" in p for p in problems)
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ResultError, match="not a valid bench result"):
        load_result(tmp_path / "bad.json")


def _check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()
        gray = im.convert("L")
    assert gray.width > 100 and gray.height > 100
    lo, hi = gray.getextrema()
    assert lo < hi  # not a blank canvas
    assert max(gray.histogram()) < 0.99 * gray.width * gray.height  # something is drawn


def test_report_writes_pngs(sweep, fake_url, tiny_images, tmp_path):
    result, path, _ = sweep
    open_loop = run_bench(
        BenchConfig(
            url=fake_url, model="echo", images=tiny_images, rates=[100, 200], requests=40, **QUICK
        )  # fmt: skip
    )
    other = save_result(open_loop, tmp_path / "open.json")
    written = report([path, other], tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "breakdown.png", "latency_cdf.png", "throughput_latency_closed.png",
        "throughput_latency_open.png",
    ]  # fmt: skip
    for p in written:
        _check_png(p)
    only = report([result], tmp_path / "one")  # loaded result, closed loop only
    assert "throughput_latency_open.png" not in {p.name for p in only}
    for p in only:
        _check_png(p)


def test_progress_events_and_tables(sweep):
    result, _, events = sweep
    kinds = [(e["point"], e["event"]) for e in events if e["event"] != "tick"]
    for point in (0, 1):
        mine = [k for i, k in kinds if i == point]
        assert mine[0] == "start" and mine[-1] == "end" and "window" in mine
    assert all(e["points"] == 2 for e in events)

    console = Console(file=io.StringIO(), width=200)
    with ProgressReporter(console) as reporter:
        for e in events:
            reporter(e)
    console.print(summary_table(result))
    console.print(breakdown_table(result))
    text = console.file.getvalue()
    assert "c=1" in text and "c=3" in text and "network" in text and "end to end" in text


def test_error_statuses_are_counted_and_the_run_goes_on(fake_url, tiny_images):
    cfg = BenchConfig(url=fake_url, model="flaky", images=tiny_images, concurrency=[2],
                      rates=[150], requests=60, **QUICK)  # fmt: skip
    result = run_bench(cfg)
    assert len(result.points) == 2
    for p in result.points:
        assert p.requests == 60
        assert set(p.errors["by_status"]) == {"500"} and p.errors["by_kind"] == {}
        assert p.errors["total"] == p.errors["by_status"]["500"] == p.requests - p.ok
        assert 0 < p.ok < p.requests
        rows = result.rows
        sel = (rows["point"] == p.index) & rows["measured"]
        assert (rows["status"][sel] == 500).sum() == p.errors["total"]


def test_429_and_malformed_server_timing(fake_url, tiny_images):
    busy = run_bench(BenchConfig(url=fake_url, model="busy", images=tiny_images,
                                 concurrency=[2], requests=40, **QUICK))  # fmt: skip
    (p,) = busy.points
    assert p.errors["by_status"] == {"429": p.requests - p.ok} and p.ok > 0

    garbled = run_bench(BenchConfig(url=fake_url, model="garbled", images=tiny_images,
                                    concurrency=[2], requests=40, **QUICK))  # fmt: skip
    (p,) = garbled.points
    assert p.errors["total"] == 0
    assert p.server_timing_malformed == p.requests  # one bad entry in each response
    assert "encode" in p.breakdown_ms  # the good entries still count


def test_timeouts_are_counted(fake_url, tiny_images):
    cfg = BenchConfig(url=fake_url, model="slow", images=tiny_images, concurrency=[1],
                      duration=0.6, warmup=0.0, timeout=0.15)  # fmt: skip
    (p,) = run_bench(cfg).points
    assert p.errors["by_kind"].get("timeout", 0) >= 1
    assert p.ok == 0 and p.latency_ms["p50"] is None


def test_open_loop_cap_drops_arrivals(fake_url, tiny_images):
    cfg = BenchConfig(url=fake_url, model="slow", images=tiny_images, rates=[60],
                      duration=0.5, warmup=0.0, max_in_flight=2)  # fmt: skip
    (p,) = run_bench(cfg).points
    assert p.dropped > 0 and p.unfinished == 2 and p.ok == 0
    assert p.dropped + p.unfinished <= p.offered_rps * p.measure_s + 1e-9


def test_stability_mode(fake_url, tiny_images):
    cfg = BenchConfig(url=fake_url, model="echo", images=tiny_images, concurrency=[2],
                      warmup=0.1, window=0.2, max_duration=1.5)  # fmt: skip
    (p,) = run_bench(cfg).points
    assert p.stop_reason in ("stable", "max_duration")
    assert p.stable is (p.stop_reason == "stable")
    assert len(p.windows) >= 3 or p.stop_reason == "max_duration"
    assert p.measure_s == pytest.approx(sum(w["seconds"] for w in p.windows[-3:]))
    assert p.requests == sum(w["completed"] for w in p.windows[-3:])


def test_unreachable_server_raises_before_the_sweep(tiny_images):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        cfg = BenchConfig(url=f"http://127.0.0.1:{port}", model="echo", images=tiny_images,
                          ready_timeout=0.3)  # fmt: skip
        with pytest.raises(ServerUnreachable, match="server not ready: cannot reach"):
            run_bench(cfg)


def test_unknown_model_raises(fake_url, tiny_images):
    with pytest.raises(TargetNotServed, match="'nope' not served"):
        run_bench(BenchConfig(url=fake_url, model="nope", images=tiny_images))


def test_refuses_to_run_inside_an_event_loop(fake_url, tiny_images):
    cfg = BenchConfig(url=fake_url, model="echo", images=tiny_images)

    async def inside():
        run_bench(cfg)

    with pytest.raises(BenchError, match="synchronous"):
        asyncio.run(inside())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(duration=1.0, requests=5), "not both"),
        (dict(concurrency=[0]), "concurrency"),
        (dict(rates=[-1.0]), "rates"),
        (dict(url="ftp://x"), "http:// or https://"),
    ],
)
def test_config_validation(kwargs, match, tiny_images):
    base = dict(url="http://127.0.0.1:1", model="m", images=tiny_images)
    with pytest.raises(ValueError, match=match):
        BenchConfig(**{**base, **kwargs})
