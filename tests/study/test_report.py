"""The study report from synthetic results of all six experiments: every file written,
the page self-contained, findings first, simulated results marked as such, the CSVs equal
to the points, and the page opening cleanly in a real (headless) browser."""

from __future__ import annotations

import base64
import csv
import html
import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from cvserve.study.report import SIMULATED_NOTE, write_report
from cvserve.study.results import (
    EXPERIMENTS,
    ExperimentResult,
    Finding,
    Point,
    save_experiment,
)

from .browser import chromium_path, inspect_page, screenshot_std

MACHINE = {
    "cpu_model": "Test CPU 3000 @ 2.1GHz",
    "cores": 2,
    "usable_cores": 2,
    "memory_bytes": 8 * 2**30,
    "platform": "Linux-test",
    "python": "3.11.2",
    "versions": {"cvserve": "0.1.0", "numpy": "2.0"},
}
RUN_INFO = {
    "command": "cvserve study --quick --out study-out",
    "elapsed_s": 754.2,
    "profile": "quick",
    "started": "2025-01-02T03:04:05Z",
}


def _bd(**ms: float) -> dict[str, float]:
    return dict(ms)


def _pct(bd: dict[str, float]) -> dict[str, float]:
    total = sum(bd.values())
    return {k: 100.0 * v / total for k, v in bd.items()}


def _point(pid: str, labels: dict, tp: float, bd: dict[str, float], **extra) -> Point:
    mean = sum(bd.values())
    metrics = {
        "throughput_rps": tp,
        "mean_ms": mean,
        "p50_ms": 0.95 * mean,
        "p99_ms": 1.6 * mean,
        "errors": 0,
        "breakdown_ms": bd,
        "breakdown_pct": _pct(bd),
        **extra,
    }
    return Point(id=pid, labels=labels, metrics=metrics, elapsed_s=12.5)


def _result(
    name: str, title: str, points: list[Point], findings: list[str], **kw
) -> ExperimentResult:
    return ExperimentResult(
        experiment=name,
        title=title,
        command=["cvserve", "study", "--only", name, "--out", "study out"],
        profile="quick",
        params={"duration_s": 2.0},
        points=points,
        findings=[
            Finding(id=f"{name}-{i}", text=t, values={"x": 1.0}) for i, t in enumerate(findings)
        ],
        machine=MACHINE,
        elapsed_s=95.0,
        **kw,
    )


def _setups() -> ExperimentResult:
    pts = []
    rows = [  # setup, throughput, decode, resize, queue, infer
        ("baseline", 38.0, 120.0, 60.0, 150.0, 45.0),
        ("full-size decode", 41.0, 110.0, 55.0, 140.0, 45.0),
        ("no batching", 52.0, 18.0, 9.0, 160.0, 40.0),
        ("2 instances", 88.0, 18.0, 9.0, 60.0, 50.0),
        ("cvserve", 95.0, 18.0, 9.0, 50.0, 45.0),
        ("litserve", 60.0, 90.0, 40.0, 80.0, 46.0),
    ]
    for setup, tp, dec, res, q, inf in rows:
        bd = _bd(recv=0.8, queue=q, decode=dec, resize=res, normalize=6.0, batch_wait=4.0,
                 infer=inf, postprocess=0.6, encode=0.3)  # fmt: skip
        pts.append(_point(setup.replace(" ", "-"), {"setup": setup, "model": "resnet50",
                                                     "concurrency": 16}, tp, bd))  # fmt: skip
    pts.append(Point(id="ray-serve", labels={"setup": "ray serve", "model": "resnet50",
                     "concurrency": 16}, status="skipped",
                     reason="ray is not installed (pip install 'ray[serve]')"))  # fmt: skip
    derived = {"x_baseline": {p.labels["setup"]: p.metrics["throughput_rps"] / 38.0
                              for p in pts if p.status == "ok"}}  # fmt: skip
    return _result(
        "setups", "Server setups, baseline to cvserve", pts,
        ["cvserve serves 2.5x the baseline's throughput on resnet50 at concurrency 16.",
         "In the baseline, decode + resize take 43% of latency & queueing < 40%."],
        derived=derived,
        paper={"figure": "Fig. 3", "claim": "Optimized preprocessing gives 2.25x throughput."},
    )  # fmt: skip


def _models() -> ExperimentResult:
    rows = [  # model, task, throughput, infer ms
        ("resnet50", "classify", 95.0, 45.0),
        ("vit-base", "classify", 30.0, 160.0),
        ("segformer-b0", "segment", 40.0, 90.0),
        ("rtdetr-r18", "detect", 25.0, 150.0),
        ("depth-anything-small", "depth", 20.0, 200.0),
    ]
    pts = []
    for model, task, tp, inf in rows:
        bd = _bd(queue=20.0, decode=18.0, resize=9.0, normalize=6.0, infer=inf, postprocess=5.0)
        pts.append(_point(model, {"model": model, "task": task}, tp, bd,
                          infer_share_pct=100.0 * inf / sum(bd.values())))  # fmt: skip
    return _result("models", "Models and tasks", pts,
                   ["Inference is 44% of resnet50's latency and 85% of depth-anything-small's."],
                   paper={"figure": "Fig. 4", "claim": "Non-DNN work is up to 56% of latency."})  # fmt: skip


def _concurrency() -> ExperimentResult:
    pts = []
    for c in (1, 2, 4, 8, 16, 32):
        q = 0.0 if c == 1 else 6.0 * c
        bd = _bd(queue=q, decode=18.0, resize=9.0, normalize=6.0, batch_wait=2.0, infer=45.0)
        mean = sum(bd.values())
        pts.append(_point(f"resnet50-c{c}", {"model": "resnet50", "concurrency": c},
                          min(95.0, c * 1000.0 / mean), bd, queue_ms=q + 2.0,
                          queue_share_pct=100.0 * (q + 2.0) / mean))  # fmt: skip
    pts.append(Point(id="resnet50-c64", labels={"model": "resnet50", "concurrency": 64},
                     status="failed", reason="429 for 41% of requests (queue full)"))  # fmt: skip
    return _result("concurrency", "Concurrency and queueing", pts,
                   ["Past concurrency 8, queueing is over half of the latency."],
                   paper={"figure": "Fig. 5", "claim": "Queueing dominates at high load."})  # fmt: skip


def _image_sizes() -> ExperimentResult:
    pts = []
    sizes = {"small": (2.0, 1.0), "medium": (18.0, 9.0), "large": (95.0, 40.0)}
    for size, (dec, res) in sizes.items():
        for server, k in (("cvserve", 1.0), ("baseline", 2.5)):
            bd = _bd(queue=10.0, decode=dec * k, resize=res * k, normalize=6.0 * k, infer=45.0)
            pre = (dec + res + 6.0) * k
            tp = 1000.0 / sum(bd.values()) * 4
            pts.append(_point(f"{size}-{server}", {"model": "resnet50", "size": size,
                              "server": server}, tp, bd, preprocess_ms=pre,
                              preprocess_share_pct=100.0 * pre / sum(bd.values()),
                              throughput_lost_pct=100.0 * (1 - tp / 110.0)))  # fmt: skip
    return _result("image-sizes", "Image sizes and preprocessing", pts,
                   ["On large images preprocessing is 67% of cvserve's latency."],
                   derived={"dnn_alone_rps": 110.0, "dnn_alone_batch": 8,
                            "dnn_alone_profile": {"1": 12.0, "8": 72.7}},
                   paper={"figure": "Sec. 4.2", "claim": "Large images: preprocessing dominates."})  # fmt: skip


def _broker() -> ExperimentResult:
    pts = []
    for broker, ms in (("inprocess", 0.4), ("redis", 3.5)):
        bd = _bd(decode=18.0, infer=60.0, broker=ms, postprocess=4.0)
        pts.append(_point(f"ocr-{broker}", {"pipeline": "ocr", "broker": broker, "fanout": None,
                          "concurrency": 8}, 12.0 - ms, bd, broker_ms=ms,
                          broker_share_pct=100.0 * ms / sum(bd.values()), items_per_s=96.0))  # fmt: skip
        for fan in (1, 4, 16):
            b = ms * fan
            bd = _bd(decode=18.0, infer=30.0 + 2.0 * fan, broker=b, postprocess=2.0)
            pts.append(_point(f"dc-{broker}-{fan}", {"pipeline": "detect-classify",
                              "broker": broker, "fanout": fan, "concurrency": 8},
                              40.0 / (1 + 0.05 * b), bd, broker_ms=b,
                              broker_share_pct=100.0 * b / sum(bd.values()),
                              items_per_s=fan * 40.0 / (1 + 0.05 * b)))  # fmt: skip
    return _result("broker", "Multi-DNN pipelines and the broker", pts,
                   ["With Redis and fan-out 16 the broker is 53% of the latency."],
                   paper={"figure": "Fig. 7", "claim": "The broker adds up to 40% of latency."})  # fmt: skip


def _accelerator() -> ExperimentResult:
    pts = []
    alone = {"1x": 110.0, "10x": 1100.0, "100x": 11000.0}
    pre = {"small": 1.5, "medium": 9.0, "large": 45.0}
    for speedup, inf_rps in alone.items():
        for size, ms in pre.items():
            tp = min(inf_rps, 2 * 1000.0 / ms)
            bd = _bd(queue=5.0, decode=ms * 0.6, resize=ms * 0.3, normalize=ms * 0.1,
                     infer=1000.0 / inf_rps * 8)  # fmt: skip
            p = _point(f"{speedup}-{size}", {"model": "resnet50", "speedup": speedup,
                       "size": size, "concurrency": 64}, tp, bd, inference_alone_rps=inf_rps,
                       e2e_vs_inference_pct=100.0 * tp / inf_rps)  # fmt: skip
            p.simulated = True
            pts.append(p)
    derived = {
        "profiles": {sp: {"file": f"/tmp/study/profiles/resnet50-{sp}.yaml", "speedup": int(sp[:-1]),
                          "latency_ms": {"1": 8000.0 / r, "8": 8000.0 / r * 5},
                          "inference_alone_rps": r} for sp, r in alone.items()},
        "cpu_ms_per_image": {s: {"cvserve": ms, "baseline": 2.5 * ms} for s, ms in pre.items()},
        "cores_per_1000_rps": {s: {"cvserve": ms, "baseline": 2.5 * ms} for s, ms in pre.items()},
        "cores_needed": {sp: {s: {"cvserve": r * ms / 1000, "baseline": 2.5 * r * ms / 1000}
                              for s, ms in pre.items()} for sp, r in alone.items()},
    }  # fmt: skip
    return _result("accelerator", "A 100x accelerator, simulated", pts,
                   ["At 100x, medium images need 99 host cores to keep the accelerator busy."],
                   derived=derived,
                   paper={"figure": "Sec. 5", "claim": "Faster accelerators shift the bottleneck."})  # fmt: skip


def all_results() -> list[ExperimentResult]:
    return [_setups(), _models(), _concurrency(), _image_sizes(), _broker(), _accelerator()]


EXPECTED_PLOTS = {
    "setups": ["setups", "setups-breakdown"],
    "models": ["models"],
    "concurrency": ["concurrency"],
    "image-sizes": ["image-sizes-breakdown", "image-sizes-throughput"],
    "broker": ["broker-ocr", "broker-detect-classify"],
    "accelerator": ["accelerator-throughput", "accelerator-cores"],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[ExperimentResult], str]:
    """The report written from JSON files on disk (so they pass the schema on the way)."""
    out = tmp_path_factory.mktemp("study")
    results = all_results()
    for r in results:
        save_experiment(r, out)
    page = write_report(out, run_info=RUN_INFO)
    assert page == out / "report.html"
    return out, results, page.read_text(encoding="utf-8")


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="exp-([^"]+)"[^>]*>(.*?)</section>', page, re.S))


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", fragment))


def test_every_file_is_written(report):
    out, results, _ = report
    assert sorted(p.name for p in (out / "csv").iterdir()) == sorted(
        f"{e}.csv" for e in EXPERIMENTS
    )
    plots = sorted(p.name for p in (out / "plots").iterdir())
    expected = sorted(f"{n}.{ext}" for names in EXPECTED_PLOTS.values() for n in names
                      for ext in ("png", "svg"))  # fmt: skip
    assert plots == expected
    for name in plots:
        path = out / "plots" / name
        if name.endswith(".png"):
            with Image.open(path) as im:
                assert im.format == "PNG" and im.width > 400 and im.height > 200
        else:
            text = path.read_text(encoding="utf-8")
            assert "<svg" in text and "</svg>" in text


def test_page_is_self_contained(report):
    _, _, page = report
    assert re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I) is None
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(?:https?:)?//", page)
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(images) == sum(len(v) for v in EXPECTED_PLOTS.values())
    for src in images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.verify()  # a whole, valid PNG


def test_header_describes_the_run(report):
    _, _, page = report
    header = _text(page.split("</header>", 1)[0])
    for text in ("Test CPU 3000", "2 cores", "2025-01-02T03:04:05Z", "quick", "12 min 34 s",
                 "cvserve study --quick --out study-out"):  # fmt: skip
        assert text in header, text


def test_sections_in_order_findings_first(report):
    _, results, page = report
    assert re.findall(r'<section id="exp-([^"]+)"', page) == list(EXPERIMENTS)
    sections = _sections(page)
    for r in results:
        body = sections[r.experiment]
        for f in r.findings:
            # as the e2e test looks for it, and before the first plot
            at = body.find(html.escape(f.text, quote=False))
            assert at >= 0, f.text
            assert at < body.find("<figure"), f.text
        assert r.paper["figure"] in body and r.paper["claim"] in body
        assert html.escape(shlex.join(r.command), quote=False) in body
        assert "'study out'" in body  # shlex.join quotes what needs it


def test_simulated_is_marked_where_it_appears(report):
    _, results, page = report
    sections = _sections(page)
    assert [r.experiment for r in results if r.simulated] == ["accelerator"]
    sim = sections["accelerator"]
    assert html.escape(SIMULATED_NOTE, quote=False) in sim
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", sim, re.S)
    assert len(captions) == 2 and all("(simulated)" in c and "SIMULATED" in c for c in captions)
    assert "SIMULATED" in re.search(r"<caption>(.*?)</caption>", sim, re.S).group(1)
    for name in ("setups", "models", "concurrency", "image-sizes", "broker"):
        assert "SIMULATED" not in sections[name] and "(simulated)" not in sections[name], name


def test_skipped_and_failed_points_show_their_reason(report):
    _, _, page = report
    sections = _sections(page)
    assert "ray is not installed (pip install 'ray[serve]')" in _text(sections["setups"])
    assert "SKIPPED" in sections["setups"]
    assert "429 for 41% of requests (queue full)" in _text(sections["concurrency"])
    assert "Points (6 of 7 measured)" in _text(sections["setups"])


def test_csv_rows_match_the_points(report):
    out, results, _ = report
    for r in results:
        with (out / "csv" / f"{r.experiment}.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [row["id"] for row in rows] == [p.id for p in r.points]
        for row, p in zip(rows, r.points, strict=True):
            assert row["status"] == p.status
            assert row["reason"] == (p.reason or "")
            assert row["simulated"] == ("true" if p.simulated else "false")
            for key, value in p.labels.items():
                assert row[key] == ("" if value is None else str(value)), key
            for key in ("throughput_rps", "mean_ms", "p99_ms", "queue_ms", "broker_share_pct"):
                if key in p.metrics:
                    assert float(row[key]) == pytest.approx(p.metrics[key], rel=1e-12)
                elif key in row:
                    assert row[key] == ""
            for stage, ms in p.metrics.get("breakdown_ms", {}).items():
                assert float(row[f"breakdown_ms.{stage}"]) == pytest.approx(ms, rel=1e-12)


def test_experiments_not_run_say_how_to_run_them(tmp_path):
    results = [r for r in all_results() if r.experiment in ("models", "broker")]
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    sections = _sections(page)
    assert list(sections) == list(EXPERIMENTS)
    for name in EXPERIMENTS:
        if name in ("models", "broker"):
            assert "not run" not in sections[name]
        else:
            assert "not run" in sections[name]
            assert f"cvserve study --only {name}" in sections[name]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["broker.csv", "models.csv"]


def test_unreadable_result_is_reported_not_raised(tmp_path):
    save_experiment(_models(), tmp_path)
    (tmp_path / "setups.json").write_text("{not json")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    sections = _sections(page)
    assert "unreadable" in sections["setups"] and "setups.json" in sections["setups"]
    assert "<figure" in sections["models"]


def test_sparse_results_still_make_a_report(tmp_path):
    """Points with little more than a throughput and odd labels: no plot may raise."""
    sparse = []
    for name in EXPERIMENTS:
        pts = [Point(id="a", labels={"x": 1}, metrics={"throughput_rps": 10.0}),
               Point(id="b", labels={}, metrics={}, status="skipped", reason="nope")]  # fmt: skip
        sparse.append(ExperimentResult(experiment=name, title=name, command=["cvserve"],
                                       profile="quick", params={}, points=pts, machine=MACHINE))  # fmt: skip
    sparse.append(ExperimentResult(experiment="models", title="dup", command=[], profile="quick",
                                   params={}, machine=MACHINE))  # fmt: skip
    page = write_report(tmp_path, sparse).read_text(encoding="utf-8")
    assert "Could not draw" not in page
    assert "No finding" in page
    assert len(_sections(page)) == len(EXPERIMENTS)


def test_rewrite_drops_plots_no_longer_drawn(tmp_path):
    save_experiment(_setups(), tmp_path)
    write_report(tmp_path)
    assert (tmp_path / "plots" / "setups-breakdown.svg").exists()
    bare = _setups()
    for p in bare.points:
        p.metrics.pop("breakdown_ms", None)
    write_report(tmp_path, [bare])
    assert not (tmp_path / "plots" / "setups-breakdown.svg").exists()
    assert (tmp_path / "plots" / "setups.svg").exists()


# --- a real browser ---------------------------------------------------------------------
needs_chromium = pytest.mark.skipif(
    chromium_path() is None, reason="chromium is not installed (apt-get install chromium)"
)


@needs_chromium
def test_report_opens_cleanly_in_chromium(report):
    out, _, _ = report
    page = inspect_page(out / "report.html")
    assert page.console_errors == []
    assert page.broken_images == 0, page.broken_srcs
    assert page.images == sum(len(v) for v in EXPECTED_PLOTS.values())
    assert page.title.startswith("cvserve study")
    with Image.open(io.BytesIO(page.screenshot_png)) as im:
        assert im.size == (1280, 1600)
    assert screenshot_std(page.screenshot_png) > 10.0  # not a blank page


@needs_chromium
def test_browser_helper_sees_what_is_wrong(tmp_path):
    """The checks above can fail: a broken image, an error and an exception are all seen."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body><h1>bad page</h1>"
        '<img src="missing.png"><script>console.error("boom"); throw new Error("oops")'
        "</script></body></html>"
    )
    page = inspect_page(bad)
    assert page.broken_images == 1 and page.broken_srcs == ["missing.png"]
    errors = "\n".join(page.console_errors)
    assert "boom" in errors and "oops" in errors and "missing.png" in errors
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><title>b</title></head><body></body></html>")
    assert screenshot_std(inspect_page(blank).screenshot_png) < 1.0
