"""The HTTP server end to end: real server, real files, real concurrency."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from bad_files import KIND, STATUS

from cvserve.images.preprocess import Preprocessor
from cvserve.models import store
from cvserve.runtime import OrtRuntime
from cvserve.tasks import get_head
from cvserve.trace import SERVER_STAGES, parse_server_timing

PREDICT = "/v1/models/tiny-resnet:predict"


def _alone(cache, data: bytes) -> list[dict]:
    """The image's result computed alone: batch of one, no server."""
    meta = store.load_meta("tiny-resnet", cache)
    pre = Preprocessor(meta.preprocess)
    x = np.empty((1, *meta.preprocess.input_shape), np.float32)
    m = pre.run(data, x[0])
    rt = OrtRuntime(store.model_path(meta, cache))
    return get_head(meta).postprocess([o[0] for o in rt.run(x)], m)["top_k"]


async def _burst(url: str, bodies: list[bytes], headers=None) -> list[tuple[httpx.Response, float]]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(body):
            t0 = time.perf_counter()
            r = await client.post(PREDICT, content=body, headers=headers)
            return r, time.perf_counter() - t0

        return await asyncio.gather(*(one(b) for b in bodies))


def _check_timing(r: httpx.Response, client_seconds: float) -> dict[str, float]:
    header = r.headers.get("server-timing")
    assert header, f"no Server-Timing on a {r.status_code}"
    stages, malformed = parse_server_timing(header)
    assert malformed == 0
    assert set(stages) <= set(SERVER_STAGES)
    assert len(header.split(",")) == len(stages)  # no name outside the vocabulary
    assert sum(stages.values()) <= client_seconds
    return stages


def test_concurrent_distinct_images_each_get_their_own_result(server, model_cache, distinct_images):
    responses = asyncio.run(_burst(server.url, distinct_images))
    batch_sizes = []
    for body, (r, secs) in zip(distinct_images, responses, strict=True):
        assert r.status_code == 200, r.text
        got = r.json()
        want = _alone(model_cache, body)
        assert [t["index"] for t in got["top_k"]] == [t["index"] for t in want]
        np.testing.assert_allclose(
            [t["score"] for t in got["top_k"]], [t["score"] for t in want], rtol=1e-4, atol=1e-6
        )
        stages = _check_timing(r, secs)
        assert {"recv", "queue", "decode", "resize", "normalize", "batch_wait", "infer"} <= set(
            stages
        )
        batch_sizes.append(got["batch_size"])
    assert max(batch_sizes) > 1  # they really rode in shared batches


def test_malformed_images_hurt_no_batch_mate(server, model_cache, distinct_images, data_dir):
    names = (
        "truncated_jpeg.jpg", "broken.png", "notjpeg.jpg", "shortfile.bmp",
        "79f5fc6bca756e1f067c6fc83e18b32e.jpg", "truncated_image.png", "monkey12.jpg", "max_size.jpg",
    )  # fmt: skip
    bad = {(data_dir / "bad" / n).read_bytes(): n for n in names}
    assert len(bad) == len(names)
    good = distinct_images[:24]
    bodies = [x for pair in zip(good[:8], bad, strict=True) for x in pair] + good[8:]
    responses = asyncio.run(_burst(server.url, bodies))
    for body, (r, secs) in zip(bodies, responses, strict=True):
        _check_timing(r, secs)
        if body in bad:
            status = STATUS[bad[body]]
            assert r.status_code == status, (bad[body], r.status_code)
            assert r.json()["error"]["kind"] == KIND[status]
            assert r.json()["error"]["message"]
        else:
            assert r.status_code == 200
            want = _alone(model_cache, body)
            assert [t["index"] for t in r.json()["top_k"]] == [t["index"] for t in want]


def test_every_bad_file_gets_an_answer_and_the_server_stays_healthy(server, data_dir):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in sorted((data_dir / "bad").iterdir()):
            t0 = time.perf_counter()
            r = c.post(PREDICT, content=path.read_bytes())
            _check_timing(r, time.perf_counter() - t0)
            assert r.status_code == STATUS[path.name], (path.name, r.status_code, r.text)
            if r.status_code == 200:
                assert r.json()["top_k"]
            else:
                err = r.json()["error"]
                assert err["kind"] == KIND[r.status_code] and err["message"], path.name
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").json()["ready"] is True
        ok = c.post(PREDICT, content=(data_dir / "images" / "small" / "dog.jpg").read_bytes())
        assert ok.status_code == 200


def test_request_errors_are_typed(server, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/models/nope:predict", content=jpg)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "model_not_found"
        r = c.post(PREDICT, content=b'{"a": 1}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and '{"image": "<base64>"}' in r.json()["error"]["message"]
        r = c.post(PREDICT, content=jpg, headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = c.post(PREDICT, content=b"x" * (4 * 1024 * 1024 + 1))
        assert r.status_code == 413 and r.json()["error"]["max_body_bytes"] == 4 * 1024 * 1024
        r = c.post(PREDICT + "?top_k=0", content=jpg)
        assert r.status_code == 400
        r = c.post(PREDICT, content=jpg, headers={"x-timeout-ms": "abc"})
        assert r.status_code == 400
        r = c.post(PREDICT, content=jpg, headers={"x-timeout-ms": "0.001"})
        assert r.status_code == 504 and r.json()["error"]["kind"] == "deadline_exceeded"
        for resp in (c.get("/healthz"), c.get("/v1/models"), c.get("/nowhere")):
            assert resp.headers.get("server-timing")
        r = c.post(PREDICT + "?top_k=3", content=jpg)
        assert r.status_code == 200 and len(r.json()["top_k"]) == 3
        assert r.json()["image_size"] == [800, 534]


def test_models_and_metrics_endpoints(server, data_dir):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        c.post(PREDICT, content=(data_dir / "images" / "small" / "dog.jpg").read_bytes())
        models = c.get("/v1/models").json()["models"]
        assert models[0]["name"] == "tiny-resnet" and models[0]["task"] == "classify"
        assert models[0]["input"]["shape"][1:] == [3, 32, 32]
        text = c.get("/metrics").text
    for name in (
        'cvserve_requests_total{model="tiny-resnet",status="200"}',
        'cvserve_request_duration_seconds_bucket{le="0.001",model="tiny-resnet"}',
        'cvserve_stage_duration_seconds_count{model="tiny-resnet",stage="decode"}',
        'cvserve_batch_size_count{model="tiny-resnet"}',
        'cvserve_queue_depth{model="tiny-resnet"}',
    ):
        assert name in text, name


def test_overload_gets_fast_429s(model_cache, distinct_images, server_factory):
    srv = server_factory(model_cache, max_batch_size=8, max_delay_ms=20, max_queue=2)
    try:
        responses = asyncio.run(_burst(srv.url, distinct_images))
    finally:
        srv.stop()
    codes = [r.status_code for r, _ in responses]
    assert set(codes) <= {200, 429}
    assert codes.count(429) > 0 and codes.count(200) >= 2
    for r, secs in responses:
        stages = _check_timing(r, secs)
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["max_queue"] == 2
            # Refused at the door: it never queued, decoded or waited for a batch.
            assert set(stages) <= {"recv", "encode"}


def test_yaml_config_serves_two_models_with_their_own_settings(model_cache, tmp_path, data_dir):
    from cvserve.config import load_config
    from cvserve.serving.process import ServerThread, free_port

    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(
        f"""
server:
  port: {free_port()}
  cache_dir: {model_cache}
models:
  - name: tiny-resnet
    max_batch_size: 4
  - name: tiny-direct
    model: tiny-resnet
    max_batch_size: 2
    decoder: pil
    preprocess: {{resize_mode: direct}}
"""
    )
    cfg = load_config(cfg_file)
    with ServerThread(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["tiny-resnet"]["batching"]["max_batch_size"] == 4
        assert models["tiny-direct"]["batching"]["max_batch_size"] == 2
        assert models["tiny-direct"]["preprocess"]["resize_mode"] == "direct"
        jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
        a = c.post("/v1/models/tiny-resnet:predict", content=jpg).json()
        b = c.post("/v1/models/tiny-direct:predict", content=jpg).json()
        assert a["top_k"] != b["top_k"]  # different preprocessing, different input


def test_bad_config_is_a_clear_error(tmp_path):
    from cvserve.config import ConfigError, load_config

    f = tmp_path / "bad.yaml"
    f.write_text("models:\n  - name: x\n    max_batch: 4\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(f)


def test_folded_uint8_model_serves_the_same_answers(model_cache, data_dir):
    pytest.importorskip("onnx")
    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.models import fold_normalize
    from cvserve.serving.process import ServerThread, free_port

    fold_normalize("tiny-resnet", cache=model_cache, overwrite=True)
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        # nearest: both through Pillow's 8-bit resize. (The fused resize gives a float slot
        # the fraction an 8-bit pixel rounds away, ~0.25 level: then the two models differ
        # by that input, not by the fold this test checks.)
        models=tuple(
            ModelConfig(name, preprocess={"interpolation": "nearest"})
            for name in ("tiny-resnet", "tiny-resnet-u8")
        ),
    )
    with ServerThread(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["tiny-resnet-u8"]["input"]["dtype"] == "uint8"
        for path in sorted((data_dir / "images" / "small").glob("*.jpg"))[:4]:
            a = c.post("/v1/models/tiny-resnet:predict", content=path.read_bytes()).json()
            b = c.post("/v1/models/tiny-resnet-u8:predict", content=path.read_bytes()).json()
            assert [t["index"] for t in a["top_k"]] == [t["index"] for t in b["top_k"]]
            np.testing.assert_allclose(
                [t["score"] for t in a["top_k"]], [t["score"] for t in b["top_k"]], rtol=1e-4
            )


def test_yaml_config_sets_keys_metrics_port_and_drain(model_cache, tmp_path, data_dir):
    from cvserve.config import ConfigError, load_config
    from cvserve.serving.process import ServerThread, free_port

    keys = tmp_path / "keys"
    keys.write_text("s3cret-key\n")
    metrics = free_port()
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text(
        f"""
server:
  port: {free_port()}
  cache_dir: {model_cache}
  api_key_file: {keys}
  metrics_port: {metrics}
  drain_delay_s: 0.5
  drain_timeout_s: 10
models:
  - name: tiny-resnet
"""
    )
    cfg = load_config(cfg_file)
    assert (cfg.drain_delay_s, cfg.drain_timeout_s, cfg.metrics_port) == (0.5, 10, metrics)
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with ServerThread(cfg) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post(PREDICT, content=jpg).status_code == 401
        auth = {"authorization": "Bearer s3cret-key"}
        assert c.post(PREDICT, content=jpg, headers=auth).status_code == 200
        assert c.get("/metrics", headers=auth).status_code == 404  # on its own port
        text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
        assert 'cvserve_requests_total{model="tiny-resnet",status="401"}' not in text
        assert 'cvserve_requests_total{model="tiny-resnet",status="200"}' in text
    for bad, match in (("tls_cert: a.pem", "both a certificate"), ("drain_delay_s: -1", ">= 0"),
                       (f"metrics_port: {metrics}\n  port: {metrics}", "taken")):  # fmt: skip
        cfg_file.write_text(f"server:\n  {bad}\nmodels: [{{name: m}}]\n")
        with pytest.raises(ConfigError, match=match):
            load_config(cfg_file)
