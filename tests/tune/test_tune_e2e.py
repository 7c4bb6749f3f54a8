"""``cvserve tune`` end to end: real servers, real photos, then the config it wrote served."""

from __future__ import annotations

import json
import urllib.request

from cvserve.cli import main
from cvserve.config import load_config
from cvserve.serving.process import ServerProcess
from cvserve.tune import state_path


def test_tune_writes_a_config_that_serves(model_cache, data_dir, tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    images = data_dir / "images" / "small"
    args = ["tune", "tiny-resnet", "--images", str(images), "--slo-p99-ms", "2000",
            "--budget", "30", "--out", str(out), "--point-duration", "1", "--warmup-ms", "300",
            "--max-concurrency", "8", "--cache-dir", str(model_cache)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "winner:" in printed.out and "x default" in printed.out

    doc = json.loads(state_path(out).read_text())
    table = doc["last_run"]["table"]
    assert table[0]["move"] == "default" and len(table) >= 2
    assert all(r["error"] is None for r in table)
    winner = doc["last_run"]["winner"]
    assert winner["meets_slo"] and winner["p99_ms"] <= 2000
    assert winner["throughput_rps"] == max(r["throughput_rps"] or 0 for r in table)
    for entry in doc["candidates"]:
        points = entry["measurement"]["points"]
        assert points[0]["concurrency"] == 1 and all(p["requests"] > 0 for p in points)

    cfg = load_config(out)
    assert cfg.models[0].batching.max_batch_size == winner["max_batch"]
    with ServerProcess(["--config", str(out)]) as srv:
        body = (images / "dog.jpg").read_bytes()
        req = urllib.request.Request(f"{srv.url}/v1/models/tiny-resnet:predict", data=body,
                                     headers={"content-type": "image/jpeg"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.load(r)
            assert r.status == 200
        assert answer["model"] == "tiny-resnet" and answer["top_k"]
        with urllib.request.urlopen(f"{srv.url}/v1/models/tiny-resnet", timeout=10) as r:
            described = json.load(r)
        assert described["batching"]["max_batch_size"] == winner["max_batch"]  # what it serves

    # the same command again measures nothing: every candidate comes from the state file
    assert main([*args, "--budget", "5"]) in (0, 1)
    doc2 = json.loads(state_path(out).read_text())
    assert len(doc2["candidates"]) == len(doc["candidates"])
    assert all(r["reused"] for r in doc2["last_run"]["table"])
