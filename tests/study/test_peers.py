"""Peers (LitServe, Ray Serve) serve the same model with the baseline's preprocessing and
answer what ``cvserve bench`` needs; skipped, with the reason, where not installed."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cvserve.bench import BenchConfig, run_bench
from cvserve.models import store
from cvserve.study import peers
from cvserve.study.baseline import baseline_preprocess
from cvserve.trace import parse_server_timing


def test_available_peers_names_every_peer_and_says_why_not(monkeypatch):
    found = peers.available_peers()
    assert set(found) == set(peers.PEERS) == {"litserve", "ray-serve"}
    assert all(v is None or "pip install" in v for v in found.values())
    monkeypatch.setitem(peers._REQUIREMENTS, "a", (("json", "no_such_module_x"), "a"))
    monkeypatch.setitem(peers._REQUIREMENTS, "b", (("json.no_such_sub",), "b"))
    monkeypatch.setitem(peers._REQUIREMENTS, "c", (("json.decoder", "email.mime"), "c"))
    found = peers.available_peers()
    assert found["a"].startswith("no_such_module_x not installed (pip install")
    assert found["b"].startswith("json.no_such_sub not installed")
    assert found["c"] is None


def test_unknown_peer_is_refused():
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_process("tfserving", "m.onnx", "m")


@pytest.fixture(scope="module", params=peers.PEERS)
def peer(request, model_cache):
    reason = peers.available_peers()[request.param]
    if reason is not None:
        pytest.skip(reason)
    meta = store.load_meta("tiny-resnet", model_cache)
    onnx = store.model_path(meta, model_cache)
    with peers.peer_process(request.param, onnx, "tiny-resnet") as srv:
        yield request.param, srv, onnx, meta


@pytest.mark.peers
def test_peer_answers_like_the_baseline(peer, data_dir):
    name, srv, onnx, meta = peer
    data = sorted((data_dir / "images" / "medium").glob("*.jpg"))[0].read_bytes()
    req = urllib.request.Request(
        f"{srv.url}/v1/models/tiny-resnet:predict", data=data,
        headers={"Content-Type": "image/jpeg"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        body, timing = json.loads(r.read()), r.headers["Server-Timing"]
    assert body["model"] == "tiny-resnet" and body["task"] == "classify"
    assert body["batch_size"] == 1 and len(body["top_k"]) == 5
    x = baseline_preprocess(data, meta.preprocess)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    z = sess.run(None, {sess.get_inputs()[0].name: x})[0][0].astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert [t["index"] for t in body["top_k"]] == np.argsort(-p)[:5].tolist()
    np.testing.assert_allclose([t["score"] for t in body["top_k"]], np.sort(p)[::-1][:5], rtol=1e-5)

    stages, bad = parse_server_timing(timing)
    assert bad == 0
    assert {"recv", "queue", "decode", "resize", "normalize", "infer", "postprocess"} <= set(stages)

    with urllib.request.urlopen(f"{srv.url}/v1/models/tiny-resnet", timeout=10) as r:
        info = json.loads(r.read())
    assert info["server"] == name and info["preprocess"]["height"] == 32

    bad_req = urllib.request.Request(
        f"{srv.url}/v1/models/tiny-resnet:predict", data=b"garbage",
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad_req, timeout=30)
    assert e.value.code == 400
    assert "cannot decode" in json.loads(e.value.read())["error"]["message"]


@pytest.mark.peers
def test_bench_drives_the_peer(peer, data_dir):
    _, srv, _, _ = peer
    res = run_bench(BenchConfig(
        url=srv.url, model="tiny-resnet", images=data_dir / "images" / "small",
        concurrency=[2], requests=10, warmup=0.0,
    ))  # fmt: skip
    (point,) = res.points
    assert point.ok == 10 and point.errors["total"] == 0
    assert point.server_timing_missing == 0 and point.server_timing_malformed == 0
    assert {"decode", "resize", "infer"} <= set(point.breakdown_ms)


def _live_members(pgid: int) -> list[str]:
    """Processes of group ``pgid`` that are not zombies, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(text.split(")", 1)[0])
    return out


@pytest.mark.peers
def test_stopping_a_peer_leaves_no_process_behind(peer):
    _, srv, _, _ = peer
    srv.stop()
    deadline = time.monotonic() + 10
    while _live_members(srv.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_members(srv.proc.pid) == []  # its workers and daemons went with it
