"""``cvserve study --quick`` end to end, as CI runs it: every experiment against real
servers on tiny models, every file written, the JSON valid, every finding's numbers the
JSON's, and the report opening cleanly in a real browser."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cvserve.bench.results import validate
from cvserve.study.results import (
    EXPERIMENTS,
    STUDY_SCHEMA,
    ExperimentResult,
    Point,
    load_experiment,
)

pytest.importorskip("torch", reason="the study builds its tiny models: needs the zoo extra")


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("study")
    cache = tmp_path_factory.mktemp("study-cache")
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "study", "--quick", "--out", str(out),
         "--images", str(data_dir / "images"), "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def _results(out: Path) -> dict[str, ExperimentResult]:
    return {name: load_experiment(out / f"{name}.json") for name in EXPERIMENTS}


@pytest.mark.timeout(900)
def test_quick_study_writes_every_file(quick_study):
    out, r = quick_study
    for name in EXPERIMENTS:
        doc = json.loads((out / f"{name}.json").read_text())
        assert validate(doc, STUDY_SCHEMA) == []
        assert doc["machine"]["cores"] >= 1 and doc["machine"]["versions"]["cvserve"]
        rows = list(csv.DictReader((out / "csv" / f"{name}.csv").open()))
        assert len(rows) == len(doc["points"])
        assert list((out / "plots").glob(f"{name}*.png")), name
        assert list((out / "plots").glob(f"{name}*.svg")), name
    assert (out / "report.html").stat().st_size > 10_000
    assert "report: " in r.stdout


@pytest.mark.timeout(900)
def test_quick_study_measures_what_it_claims(quick_study):
    out, _ = quick_study
    res = _results(out)
    # every experiment measured its points (skips only for what this machine lacks)
    for name, result in res.items():
        ok = result.ok_points()
        assert ok, f"{name}: no point measured: {[(p.id, p.reason) for p in result.points]}"
        for p in result.points:
            assert p.status != "failed", f"{name}/{p.id}: {p.reason}"
            if p.status == "ok":
                assert p.metrics["throughput_rps"] > 0 and p.metrics["errors"] == 0
    # only the accelerator experiment is simulated, and it says so point by point
    assert res["accelerator"].simulated and all(p.simulated for p in res["accelerator"].points)
    for p in res["accelerator"].ok_points():
        assert p.metrics["simulated_responses"] == p.metrics["requests"] > 0
    for name in EXPERIMENTS[:-1]:
        assert not res[name].simulated
    sizes = res["image-sizes"]
    # preprocessing a large photo costs more than a small one, on either server
    for server in ("cvserve", "baseline"):
        small = sizes.point(f"{server}-small-c1").metrics["preprocess_ms"]
        large = sizes.point(f"{server}-large-c1").metrics["preprocess_ms"]
        assert large > small
    cost = res["accelerator"].derived["cpu_ms_per_image"]
    assert cost["large"]["baseline"] > cost["large"]["cvserve"] > 0
    # the floor (libjpeg-turbo alone at cvserve's scale) is measured for every size
    assert all(cost[size]["floor"] > 0 for size in ("small", "medium", "large"))


def _fmt(v: float) -> str:
    from cvserve.study.experiments import fmt_number

    return fmt_number(v)


@pytest.mark.timeout(900)
def test_each_finding_sentence_prints_the_json_numbers(quick_study):
    out, _ = quick_study
    res = _results(out)
    for name, result in res.items():
        assert result.findings, f"{name} has no finding"
        for f in result.findings:
            for key, v in f.values.items():
                assert _fmt(v) in f.text, (name, f.id, key, v, f.text)
    # and the numbers are the points' numbers
    cv = res["setups"].point("cvserve").metrics["throughput_rps"]
    base = res["setups"].point("baseline").metrics["throughput_rps"]
    f = _by_id(res["setups"], "setups-speedup")
    assert f.values["thr"] == round(cv, 1) and f.values["x"] == round(cv / base, 2)

    shares = [p.metrics["infer_share_pct"] for p in res["models"].ok_points()]
    f = _by_id(res["models"], "models-infer-share")
    assert (f.values["lo"], f.values["hi"]) == (round(min(shares)), round(max(shares)))

    last = max(res["concurrency"].ok_points(), key=lambda p: p.labels["concurrency"])
    f = _by_id(res["concurrency"], "concurrency-saturation")
    assert f.values["q"] == round(last.metrics["queue_share_pct"])
    assert f.values["cmax"] == last.labels["concurrency"]

    sizes = res["image-sizes"]
    one = sizes.ok_points(server="cvserve", size="large", concurrency=1)[0].metrics
    loaded = sizes.point("cvserve-large").metrics
    f = _by_id(sizes, "sizes-large")
    assert f.values["pre"] == round(one["preprocess_share_pct"])
    assert f.values["lost"] == round(loaded["throughput_lost_pct"])

    acc = res["accelerator"]
    m = acc.ok_points(speedup="100x", size="medium")[0].metrics
    f = _by_id(acc, "accelerator-medium")
    assert f.values["pct"] == round(100 * m["throughput_rps"] / m["inference_alone_rps"])
    assert f.values["cv"] == round(acc.derived["cpu_ms_per_image"]["medium"]["cvserve"], 1)
    assert f.values["fl"] == round(acc.derived["cpu_ms_per_image"]["medium"]["floor"], 1)


def _by_id(result: ExperimentResult, fid: str):
    found = [f for f in result.findings if f.id == fid]
    assert found, f"{result.experiment}: no finding {fid}: {[f.id for f in result.findings]}"
    return found[0]


@pytest.mark.timeout(900)
def test_report_opens_in_a_real_browser(quick_study):
    from .browser import inspect_page

    out, _ = quick_study
    page = inspect_page(out / "report.html")
    assert page.console_errors == []
    assert page.broken_images == 0
    html = (out / "report.html").read_text()
    for result in _results(out).values():
        for f in result.findings:
            assert _escape(f.text) in html


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=False)


@pytest.mark.timeout(900)
def test_resume_reuses_finished_points(quick_study, tmp_path, data_dir):
    """A rerun with --resume measures nothing that is already there."""
    out, _ = quick_study
    before = load_experiment(out / "concurrency.json")
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "study", "--quick", "--only", "concurrency",
         "--resume", "--out", str(out), "--images", str(data_dir / "images")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    after = load_experiment(out / "concurrency.json")
    assert [p.metrics for p in after.points] == [p.metrics for p in before.points]
    assert "starting" not in r.stderr  # no server was started


def test_unknown_experiment_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "study", "--only", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "unknown experiment" in r.stderr and "setups" in r.stderr


def test_a_finding_is_computed_from_the_points():
    """The arithmetic of one finding, on numbers known in advance."""
    from cvserve.study.experiments import EXPERIMENT_DEFS, settings_for
    from cvserve.study.runner import StudyConfig, StudyContext

    ctx = StudyContext(
        config=StudyConfig(out=Path(".")),
        settings=settings_for("quick"),
        images_root=Path("."),
        progress=lambda e: None,
    )
    result = ExperimentResult("concurrency", "t", [], "quick", {})
    for c, thr, q in ((1, 10.0, 5.0), (4, 19.0, 40.0), (16, 20.0, 80.0)):
        result.points.append(
            Point(id=f"c{c}", labels={"concurrency": c, "model": "m"},
                  metrics={"throughput_rps": thr, "queue_share_pct": q, "mean_ms": 100.0 * c})
        )  # fmt: skip
    EXPERIMENT_DEFS["concurrency"].finish(ctx, result)
    f = result.findings[0]
    assert f.values == {"peak": 20.0, "c": 4, "cmax": 16, "q": 80.0, "lat": 1600.0}
    assert "at 4 concurrent requests" in f.text and "80%" in f.text
