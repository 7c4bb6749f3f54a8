"""`cvserve bench` and `cvserve report` against a real cvserve server, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from cvserve.bench import load_result, validate
from cvserve.trace import STAGES


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvserve", *args], capture_output=True, text=True, timeout=300
    )


def test_sweep_against_real_server_then_report(model_cache, data_dir, tmp_path):
    out = tmp_path / "tiny.json"
    r = _cli(
        "bench", "--inprocess", "--model", "tiny-resnet", "--cache-dir", str(model_cache),
        "--serve-args", "--max-batch-size 4 --max-delay-ms 2",
        "--images", str(data_dir / "images" / "small"),
        "--concurrency", "1,4", "--duration", "1.5", "--warmup-ms", "500", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert validate(doc) == []
    result = load_result(out)
    assert [p.concurrency for p in result.points] == [1, 4]
    for p in result.points:
        assert p.errors["total"] == 0 and p.ok > 0
        assert p.server_timing_malformed == 0 and p.server_timing_missing == 0
        assert set(p.breakdown_ms) <= set(STAGES)
        assert {"decode", "resize", "normalize", "batch_wait", "infer", "network"} <= set(
            p.breakdown_ms
        )
        assert p.mean_batch_size is not None and p.mean_batch_size >= 1
        assert p.mean_response_bytes is not None and p.mean_response_bytes > 50

    plots = tmp_path / "plots"
    r = _cli("report", str(out), str(out), "--out", str(plots))
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(plots.glob("*.png"))
    assert pngs
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        im = np.asarray(Image.open(png).convert("L"))
        assert im.std() > 5, png.name  # something was drawn


def test_bench_against_a_server_that_is_down_is_one_line(data_dir):
    r = _cli(
        "bench", "--url", "http://127.0.0.1:9", "--model", "x",
        "--images", str(data_dir / "images" / "small"), "--duration", "1",
    )  # fmt: skip
    assert r.returncode == 2
    assert "error:" in r.stderr and "Traceback" not in r.stderr
