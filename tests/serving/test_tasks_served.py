"""Segmentation, detection and depth models served end to end, in both encodings."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.config import ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.encode import decode_array, decode_npz
from cvserve.trace import parse_server_timing

MODELS = {"segment": "tiny-segformer", "detect": "tiny-rtdetr", "depth": "tiny-depth"}


@pytest.fixture(scope="module")
def task_server(model_cache):
    from cvserve.models import ZOO, store

    missing = [m for m in MODELS.values() if m not in ZOO]
    if missing:
        pytest.skip(f"zoo has no {missing}")
    for name in MODELS.values():
        store.ensure_built(name, model_cache)
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        models=tuple(ModelConfig(name) for name in MODELS.values()),
    )
    with ServerThread(cfg) as srv:
        yield srv


@pytest.mark.parametrize("name", ["demo08.jpg", "giraffe.jpg"])
def test_each_task_answers_at_the_original_size(task_server, data_dir, name):
    data = (data_dir / "images" / "small" / name).read_bytes()
    w, h = Image.open(data_dir / "images" / "small" / name).size
    with httpx.Client(base_url=task_server.url, timeout=60) as c:
        seg = c.post(f"/v1/models/{MODELS['segment']}:predict", content=data)
        assert seg.status_code == 200, seg.text
        body = seg.json()
        mask = decode_array(body["mask"])
        assert mask.shape == (h, w)
        assert abs(sum(x["fraction"] for x in body["classes"]) - 1) < 1e-6

        det = c.post(f"/v1/models/{MODELS['detect']}:predict?threshold=0&top_k=5", content=data)
        assert det.status_code == 200, det.text
        dets = det.json()["detections"]
        assert 0 < len(dets) <= 5
        assert all(d["score"] >= 0 and len(d["box"]) == 4 for d in dets)

        dep = c.post(f"/v1/models/{MODELS['depth']}:predict", content=data)
        assert dep.status_code == 200, dep.text
        body = dep.json()
        depth = decode_array(body["depth"])
        assert depth.shape == (h, w)
        assert body["min"] <= float(depth.mean()) <= body["max"]

        raw = c.post(
            f"/v1/models/{MODELS['segment']}:predict",
            content=data,
            headers={"accept": "application/x-npz"},
        )
        assert raw.status_code == 200 and raw.headers["content-type"] == "application/x-npz"
        meta, arrays = decode_npz(raw.content)
        assert (arrays["mask"] == mask).all() and meta["task"] == "segment"
        for r in (seg, det, dep, raw):
            stages, bad = parse_server_timing(r.headers["server-timing"])
            assert bad == 0 and {"infer", "postprocess", "encode"} <= set(stages)


def test_detectors_score_like_their_family(task_server, model_cache):
    from cvserve.models import store
    from cvserve.tasks import DetectHead

    assert DetectHead(store.load_meta("tiny-rtdetr", model_cache)).score == "sigmoid"
    assert DetectHead(store.ensure_built("tiny-yolos", model_cache)).score == "softmax"


def test_bad_input_and_bad_params(task_server, data_dir):
    with httpx.Client(base_url=task_server.url, timeout=60) as c:
        r = c.post(f"/v1/models/{MODELS['segment']}:predict", content=b"\x89PNG\r\n\x1a\nbroken")
        assert r.status_code == 400
        jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
        r = c.post(f"/v1/models/{MODELS['detect']}:predict?threshold=abc", content=jpg)
        assert r.status_code == 400 and "threshold" in r.json()["error"]["message"]
        r = c.post(f"/v1/models/{MODELS['detect']}:predict?bogus=1", content=jpg)
        assert r.status_code == 400
        assert np.isfinite(c.get("/healthz").status_code)
