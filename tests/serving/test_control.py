"""Models that change while the server runs (``serving/control.py``), against real servers:
Triton's repository calls through tritonclient (HTTP and gRPC, unmodified), the /v1
equivalents, versions and policies, loads that fail leaving what is served untouched, a
swap under load that drops nothing, the three modes, SIGHUP and ``--workers``."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from cvserve.config import BatchConfig, ConfigError, ModelConfig, ServerConfig, select_versions
from cvserve.images.spec import PreprocessSpec
from cvserve.models import store
from cvserve.models.versions import model_versions
from cvserve.serving.process import ServerProcess, ServerThread, free_port

th = pytest.importorskip("tritonclient.http", reason="needs tritonclient (test extra)")
tg = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (test extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "tiny-resnet"


@pytest.fixture
def cache(model_cache, tmp_path) -> Path:
    """A store of this test's own holding the tiny model as version 1."""
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    shutil.copytree(model_cache / "models" / MODEL, root / "models" / MODEL)
    return root


def add_version(cache: Path, n: int, name: str = MODEL, onnx: bytes | None = None) -> Path:
    """Version ``n`` of ``name``: a copy of version 1 (or ``onnx`` as its file)."""
    src = cache / "models" / MODEL
    dst = store.version_dir(name, n, cache)
    dst.mkdir(parents=True, exist_ok=True)
    if onnx is None:
        shutil.copyfile(src / "model.onnx", dst / "model.onnx")
    else:
        (dst / "model.onnx").write_bytes(onnx)
    meta = json.loads((src / "model.json").read_text())
    meta["name"] = name
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


def start(cache: Path, mode: str = "explicit", policy: str = "latest:1", **server) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(), cache_dir=str(cache), preprocess_threads=2, model_control=mode,
        models=(ModelConfig(MODEL, version_policy=policy,
                            batching=BatchConfig(max_batch_size=4, max_delay_ms=2)),),
        **server,
    )  # fmt: skip
    return ServerThread(cfg).start()


def http(srv: ServerThread):
    return th.InferenceServerClient(srv.url.removeprefix("http://"))


def infer(client, version: str = "") -> str:
    """One v2 inference of a zero tensor; the version that answered."""
    x = th.InferInput("pixel_values", [1, 3, 32, 32], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    return client.infer(MODEL, [x], model_version=version).get_response()["model_version"]


def get(url: str, key: str | None = None, data: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
            return r.status, json.loads(body) if body else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def jpeg(data_dir: Path) -> bytes:
    return sorted((data_dir / "images" / "small").glob("*.jpg"))[0].read_bytes()


# --- Triton's repository API, through tritonclient ------------------------------------
def test_tritonclient_http_index_load_unload_and_versions(cache, data_dir):
    add_version(cache, 2)
    srv = start(cache)
    try:
        c = http(srv)
        assert c.get_model_repository_index() == [
            {"name": MODEL, "version": "2", "state": "READY", "reason": ""}
        ]
        assert infer(c) == "2"  # latest:1 serves the newest
        c.unload_model(MODEL)
        assert c.get_model_repository_index() == [
            {"name": MODEL, "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
        ]
        with pytest.raises(InferenceServerException, match="no model named"):
            infer(c)
        assert get(f"{srv.url}/v2/repository/index", data=b'{"ready": true}') == (200, [])
        with pytest.raises(InferenceServerException, match="sent with the request"):
            c.load_model(MODEL, config="{}", files={"file:1/model.onnx": b"onnx"})
        c.load_model(MODEL, config=json.dumps({"version_policy": "all"}))
        index = c.get_model_repository_index()
        assert [(r["version"], r["state"]) for r in index] == [("1", "READY"), ("2", "READY")]
        assert c.get_model_metadata(MODEL)["versions"] == ["1", "2"]
        assert infer(c) == "2" and infer(c, "1") == "1" and infer(c, "2") == "2"
        with pytest.raises(InferenceServerException, match="no version '7'"):
            infer(c, "7")
        # /v1: name@version, and the description of every loaded version
        status, body = get(f"{srv.url}/v1/models/{MODEL}@1")
        assert status == 200 and body["version"] == "1"
        req = urllib.request.Request(f"{srv.url}/v1/models/{MODEL}@1:predict", data=jpeg(data_dir),
                                     headers={"Content-Type": "image/jpeg"})  # fmt: skip
        with urllib.request.urlopen(req) as r:
            assert r.status == 200
        assert get(f"{srv.url}/v1/models/{MODEL}@9")[0] == 404
        status, body = get(f"{srv.url}/v1/models")
        assert [(m["name"], m["version"]) for m in body["models"]] == [(MODEL, "1"), (MODEL, "2")]
        assert all(m["memory"]["weights_bytes"] > 0 for m in body["models"])
        metrics = urllib.request.urlopen(f"{srv.url}/metrics").read().decode()
        assert (
            f'cvserve_model_memory_bytes{{kind="weights",model="{MODEL}",version="1"}}' in metrics
        )
    finally:
        srv.stop()


def test_tritonclient_grpc_index_load_unload(cache):
    add_version(cache, 2)
    cfg_srv = start(cache, policy="latest:2", grpc_port=0)
    try:
        g = tg.InferenceServerClient(cfg_srv.grpc_target)
        index = g.get_model_repository_index(as_json=True)["models"]
        assert [(r["version"], r["state"]) for r in index] == [("1", "READY"), ("2", "READY")]
        g.unload_model(MODEL)
        index = g.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": MODEL, "state": "UNAVAILABLE", "reason": "unloaded"}]
        g.load_model(MODEL)
        assert g.is_model_ready(MODEL, "1") and g.is_model_ready(MODEL, "2")
        with pytest.raises(InferenceServerException) as e:
            g.load_model("no-such-model")
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "unknown model 'no-such-model'" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            g.unload_model("no-such-model")
        assert e.value.status() == "StatusCode.NOT_FOUND"
    finally:
        cfg_srv.stop()


# --- loads that fail: a clear error, and what is served untouched ----------------------
def test_a_file_that_fails_to_open_or_does_not_fit_leaves_the_served_model(cache):
    srv = start(cache, model_memory_bytes=400_000)
    try:
        c = http(srv)
        add_version(cache, 3, onnx=b"this is not an ONNX file")
        with pytest.raises(InferenceServerException) as e:
            c.load_model(MODEL)
        assert e.value.status() == "400" and "version 3" in e.value.message()
        assert "model.onnx" in e.value.message()
        assert infer(c) == "1"  # still served, untouched
        shutil.rmtree(store.version_dir(MODEL, 3, cache))
        # 4 instances of max batch 64 take more than the 400 kB the models may hold
        status, body = get(f"{srv.url}/v1/models/{MODEL}:load",
                           data=json.dumps({"instances": 4, "max_batch_size": 64}).encode())  # fmt: skip
        assert status == 507, body
        assert body["error"]["kind"] == "insufficient_memory"
        assert "model_memory_bytes left" in body["error"]["message"]
        assert infer(c) == "1"
        status, body = get(f"{srv.url}/v1/models/{MODEL}:load", data=b"[1]")
        assert status == 400 and "JSON object" in body["error"]["message"]
    finally:
        srv.stop()


def test_mode_none_refuses_loads_but_answers_the_index(cache):
    srv = start(cache, mode="none")
    try:
        status, body = get(f"{srv.url}/v1/models/{MODEL}:unload", data=b"")
        assert status == 400 and "model control is 'none'" in body["error"]["message"]
        status, body = get(f"{srv.url}/v1/repository")
        assert status == 200 and body["mode"] == "none"
        assert body["models"] == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    finally:
        srv.stop()


def test_the_repository_api_needs_the_key(cache, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sesame-0123456789\n")
    srv = start(cache, api_key_file=str(keys))
    try:
        assert get(f"{srv.url}/v1/repository")[0] == 401
        assert get(f"{srv.url}/v2/repository/index", data=b"")[0] == 401
        assert get(f"{srv.url}/v2/repository/models/{MODEL}/unload", data=b"")[0] == 401
        assert get(f"{srv.url}/v1/repository", key="sesame-0123456789")[0] == 200
    finally:
        srv.stop()


# --- a swap that drops nothing ----------------------------------------------------------
def test_swapping_versions_under_load_fails_no_request(cache, data_dir):
    srv = start(cache)
    body = jpeg(data_dir)
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            req = urllib.request.Request(f"{srv.url}/v1/models/{MODEL}:predict", data=body,
                                         headers={"Content-Type": "image/jpeg"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for n in (2, 3, 4):
            add_version(cache, n)
            status, _ = get(f"{srv.url}/v1/models/{MODEL}:load", data=b"")
            assert status == 200
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.stop()
    assert len(statuses) > 20 and set(statuses) == {200}
    assert list(srv.state.versions[MODEL]) == ["4"]


# --- poll ----------------------------------------------------------------------------
def test_poll_follows_new_and_removed_versions(cache):
    srv = start(cache, mode="poll", poll_interval_ms=100)
    try:
        c = http(srv)
        add_version(cache, 2)
        wait_for(lambda: list(srv.state.versions.get(MODEL, {})) == ["2"])
        assert infer(c) == "2"
        status, body = get(f"{srv.url}/v1/models/{MODEL}:load", data=b"")
        assert status == 400 and "'poll'" in body["error"]["message"]
        shutil.rmtree(cache / "models" / MODEL)
        wait_for(lambda: MODEL not in srv.state.versions)
        row = c.get_model_repository_index()[0]
        assert row["state"] == "UNAVAILABLE" and row["reason"] == "removed from the store"
    finally:
        srv.stop()


# --- SIGHUP, --workers ---------------------------------------------------------------------
def _models(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in get(f"{url}/v1/models")[1]["models"]}


def test_sighup_applies_the_config_file_difference(cache, tmp_path):
    conf = tmp_path / "serve.yaml"

    def write(models: list[dict]) -> None:
        conf.write_text(json.dumps({"server": {"cache_dir": str(cache)}, "models": models}))

    write([{"name": MODEL, "max_batch_size": 4}, {"name": "gone", "model": MODEL}])
    with ServerProcess(["--config", str(conf)]) as srv:
        assert set(_models(srv.url)) == {MODEL, "gone"}
        write([{"name": MODEL, "max_batch_size": 2}, {"name": "added", "model": MODEL}])
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(_models(srv.url)) == {MODEL, "added"})
        wait_for(lambda: _models(srv.url)[MODEL]["batching"]["max_batch_size"] == 2)
        conf.write_text("models: [")  # a broken file changes nothing
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert srv.proc.poll() is None and set(_models(srv.url)) == {MODEL, "added"}
        assert "config reload failed" in srv.output()


def test_workers_follow_a_load_made_through_one_of_them_and_sighup(cache, tmp_path):
    conf = tmp_path / "serve.yaml"
    conf.write_text(json.dumps({"server": {"cache_dir": str(cache), "workers": 2,
                                           "model_control": "explicit"},
                                "models": [{"name": MODEL}]}))  # fmt: skip
    with ServerProcess(["--config", str(conf), "--preprocess-threads", "1"]) as srv:
        status, _ = get(f"{srv.url}/v1/models/{MODEL}:load",
                        data=json.dumps({"max_batch_size": 3}).encode())  # fmt: skip
        assert status == 200

        def every_process(check) -> bool:  # new connections spread over both processes
            return all(check(_models(srv.url)) for _ in range(24))

        wait_for(lambda: every_process(lambda m: m[MODEL]["batching"]["max_batch_size"] == 3))
        # SIGHUP to the parent: it rereads the file, every process applies it
        conf.write_text(conf.read_text().replace('"models": [', '"models": [{"name": "b", '
                                                 f'"model": "{MODEL}"}}, '))  # fmt: skip
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: every_process(lambda m: set(m) == {MODEL, "b"}))


# --- the parts -----------------------------------------------------------------------------
def test_version_policies():
    assert select_versions("latest", [3, 1, 2]) == [3]
    assert select_versions("latest:2", [1, 2, 3]) == [2, 3]
    assert select_versions("all", [2, 1]) == [1, 2]
    assert select_versions("specific:1,3", [1, 2, 3]) == [1, 3]
    for bad in ("latest:0", "newest", "specific:", "specific:a", "all:2"):
        with pytest.raises(ConfigError, match="version_policy"):
            ModelConfig("m", version_policy=bad)
    with pytest.raises(ConfigError, match="model_control 'sometimes'"):
        ServerConfig(model_control="sometimes")


def test_store_versions_and_the_cli(cache, tmp_path):
    from cvserve.cli import main

    onnx = cache / "models" / MODEL / "model.onnx"
    assert main(["models", "add", str(onnx), "--name", "mine", "--size", "32", "--resize", "0",
                 "--version", "3", "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert main(["models", "add", str(onnx), "--name", "mine", "--size", "32", "--resize", "0",
                 "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert list(model_versions("mine", cache)) == [1, 3]
    assert (cache / "models" / "mine" / "3" / "model.onnx").is_file()
    spec = PreprocessSpec(height=32, width=32, resize_mode="direct")
    with pytest.raises(FileExistsError, match="version 3 already exists"):
        store.add_model(onnx, "mine", cache=cache, version=3, spec=spec)


def test_warm_up_runs_every_batch_size(cache):
    from cvserve.config import ServerConfig as SC
    from cvserve.models.versions import model_versions as mv
    from cvserve.serving.core import PreprocessPool
    from cvserve.serving.loading import open_model
    from cvserve.serving.metrics import Metrics

    mc = ModelConfig(MODEL, batching=BatchConfig(max_batch_size=5, instances=2))
    ms = open_model(SC(cache_dir=str(cache)), mc, 1, mv(MODEL, cache)[1], PreprocessPool(1),
                    Metrics())  # fmt: skip
    sizes: list[int] = []
    for rt in ms._runtimes:
        run = rt.run
        rt.run = lambda x, run=run: (sizes.append(len(x)), run(x))[1]
    ms.warm_up()
    assert sorted(sizes) == sorted([1, 2, 3, 4, 5] * 2)


def test_a_pipeline_keeps_answering_while_its_classifier_model_is_swapped(cache, data_dir):
    """A pipeline's DNNs are its own: a served model of the same store name swapped or
    unloaded never touches it."""
    from cvserve.config import PipelineConfig

    store.ensure_built("tiny-yolos", cache)
    params = {"detector": "tiny-yolos", "classifier": MODEL, "objects": 2}
    cfg = ServerConfig(
        port=free_port(), cache_dir=str(cache), preprocess_threads=2, model_control="explicit",
        models=(ModelConfig(MODEL),),
        pipelines=(PipelineConfig("dc", kind="detect-classify", block_ms=5, params=params,
                                  runtime="simulated", sim_profile={"det": "1:5", "cls": "1:5"}),),
    )  # fmt: skip
    statuses: list[int] = []
    with ServerThread(cfg) as srv:
        body = jpeg(data_dir)

        def ask() -> None:
            req = urllib.request.Request(f"{srv.url}/v1/pipelines/dc:predict", data=body,
                                         headers={"Content-Type": "image/jpeg"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=60) as r:
                statuses.append(r.status)

        add_version(cache, 2)
        load = f"{srv.url}/v1/models/{MODEL}:load"
        loader = threading.Thread(target=get, args=(load, None, b""))
        loader.start()
        while loader.is_alive() or len(statuses) < 5:
            ask()
        assert list(srv.state.versions[MODEL]) == ["2"]
        assert get(f"{srv.url}/v1/models/{MODEL}:unload", data=b"")[0] == 200
        status, answer = get(f"{srv.url}/v1/models/dc:unload", data=b"")
        assert status == 400 and "pipeline" in answer["error"]["message"]
        ask()
    assert set(statuses) == {200}
