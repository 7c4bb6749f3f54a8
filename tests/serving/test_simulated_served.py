"""A real server on the simulated accelerator: config, describe, Server-Timing, bench."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cvserve.bench import BenchConfig, load_images, load_result, run_bench, save_result, validate
from cvserve.cli import build_parser, server_config_from_args
from cvserve.config import (
    BatchConfig,
    ConfigError,
    ModelConfig,
    ServerConfig,
    server_config_from_dict,
)
from cvserve.serving.process import ServerThread, free_port
from cvserve.trace import parse_server_timing, server_timing_simulated

PROFILE = "1:60,8:80"


def _start(cache, **model) -> ServerThread:
    batching = model.pop("batching", BatchConfig(max_batch_size=8, max_delay_ms=5))
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        preprocess_threads=2,
        models=(ModelConfig("tiny-resnet", batching=batching, **model),),
    )
    return ServerThread(cfg).start()


@pytest.fixture(scope="module")
def sim_server(model_cache):
    srv = _start(model_cache, runtime="simulated", sim_profile=PROFILE, sim_h2d_gbps=0.5)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jpeg(data_dir) -> bytes:
    return (data_dir / "images" / "small" / "dog.jpg").read_bytes()


def test_config_and_flags_take_the_simulated_runtime():
    cfg = server_config_from_dict(
        {"models": [{"name": "m", "runtime": "simulated", "sim_profile": "1:2,8:4",
                     "sim_devices": 2, "sim_h2d_gbps": 12.5, "instances": 3}]}
    )  # fmt: skip
    m = cfg.models[0]
    assert (m.runtime, m.sim_profile, m.sim_devices, m.sim_h2d_gbps) == (
        "simulated",
        "1:2,8:4",
        2,
        12.5,
    )
    assert m.batching.instances == 3
    for entry, says in [
        ({"runtime": "simulated"}, "needs a latency profile"),
        ({"runtime": "simulated", "sim_profile": "1:0"}, "must be > 0"),
        ({"runtime": "tensorrt"}, "choose one of onnxruntime, simulated"),
        ({"runtime": "simulated", "sim_profile": "1:1", "sim_devices": 0}, "sim_devices"),
        ({"runtime": "simulated", "sim_profile": "1:1", "sim_h2d_gbps": -1}, "sim_h2d_gbps"),
        ({"sim_profile": "1:1"}, "need the simulated runtime"),
    ]:
        with pytest.raises(ConfigError, match=says):
            server_config_from_dict({"models": [{"name": "m", **entry}]})

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--runtime", "simulated", "--sim-profile", "resnet50-trt-t4",
         "--sim-devices", "2", "--sim-h2d-gbps", "25"]
    )  # fmt: skip
    m = server_config_from_args(args).models[0]
    assert (m.runtime, m.sim_profile, m.sim_devices, m.sim_h2d_gbps) == (
        "simulated", "resnet50-trt-t4", 2, 25.0,
    )  # fmt: skip
    plain = server_config_from_args(build_parser().parse_args(["serve", "--model", "m"]))
    assert plain.models[0].runtime == "onnxruntime"
    with pytest.raises(ConfigError, match="needs a latency profile"):
        server_config_from_args(
            build_parser().parse_args(["serve", "--model", "m", "--runtime", "simulated"])
        )


def test_simulated_responses_say_so(sim_server, jpeg):
    with httpx.Client(base_url=sim_server.url, timeout=30) as c:
        r = c.post("/v1/models/tiny-resnet:predict", content=jpeg)
        assert r.status_code == 200, r.text
        assert len(r.json()["top_k"]) == 5  # the real head ran on the simulated logits
        timing = r.headers["server-timing"]
        assert server_timing_simulated(timing)
        assert "infer;dur=" in timing and ";sim=1" in timing.split("infer;", 1)[1].split(",")[0]
        stages, bad = parse_server_timing(timing)
        assert bad == 0 and {"batch_wait", "h2d", "infer", "d2h"} <= set(stages)
        assert 0.060 <= stages["infer"] < 0.060 * 1.5  # batch of 1: the profile's 60 ms
        assert 0 < stages["h2d"] < 0.005  # 12 KB at 0.5 GB/s: ~25 us

        d = c.get("/v1/models/tiny-resnet").json()["runtime"]
        assert d["kind"] == "simulated" and d["simulated"] is True
        assert d["devices"] == 1 and d["h2d_gbps"] == 0.5
        assert d["profile"]["latency_ms"] == {"1": 60.0, "8": 80.0}
        assert d["profile"]["source"] == f"given inline: {PROFILE}"
        listed = c.get("/v1/models").json()["models"][0]["runtime"]
        assert listed == d
        # errors before inference carry no flag
        bad_img = c.post("/v1/models/tiny-resnet:predict", content=b"\xff\xd8\xffbroken")
        assert bad_img.status_code == 400
        assert not server_timing_simulated(bad_img.headers["server-timing"])


def test_real_runtime_says_it_is_real(server, jpeg):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/models/tiny-resnet:predict", content=jpeg)
        assert r.status_code == 200 and not server_timing_simulated(r.headers["server-timing"])
        d = c.get("/v1/models/tiny-resnet").json()["runtime"]
        assert d["kind"] == "onnxruntime" and d["simulated"] is False
        assert "CPUExecutionProvider" in d["providers"]


def test_waiting_for_a_busy_device_is_batch_wait(model_cache, jpeg):
    """Two instances share one device: the second batch waits for it, and that wait is
    charged to batch_wait, not to infer."""
    srv = _start(
        model_cache, runtime="simulated", sim_profile="1:150", sim_devices=1,
        batching=BatchConfig(max_batch_size=1, max_delay_ms=0, instances=2),
    )  # fmt: skip
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(2) as pool:
            rs = list(
                pool.map(lambda _: c.post("/v1/models/tiny-resnet:predict", content=jpeg), range(2))
            )
        stages = [parse_server_timing(r.headers["server-timing"])[0] for r in rs]
        assert all(r.status_code == 200 for r in rs)
        for s in stages:
            assert 0.150 <= s["infer"] < 0.150 * 1.5
        assert max(s["batch_wait"] for s in stages) >= 0.100
    finally:
        srv.stop()


def test_bench_results_record_simulated_inference(model_cache, data_dir, tmp_path):
    """`cvserve serve --runtime simulated` in a child process, measured by run_bench."""
    from cvserve.serving.process import ServerProcess

    flags = ["--model", "tiny-resnet", "--cache-dir", str(model_cache), "--runtime",
             "simulated", "--sim-profile", PROFILE, "--preprocess-threads", "2"]  # fmt: skip
    with ServerProcess(flags) as srv:
        result = _bench(srv.url, data_dir)
    _check_simulated_result(result, tmp_path)


def _bench(url, data_dir):
    cfg = BenchConfig(
        url=url, model="tiny-resnet", images=load_images(data_dir / "images" / "small"),
        concurrency=[2], duration=0.8, warmup=0.2,
    )  # fmt: skip
    return run_bench(cfg, command=["test"])


def _check_simulated_result(result, tmp_path):
    point = result.points[0]
    assert point.ok > 0 and point.simulated_responses == point.ok
    assert any("simulated accelerator" in w for w in point.warnings)
    assert result.simulated
    assert result.rows["simulated"][result.rows["measured"]].all()
    path = save_result(result, tmp_path / "sim")
    doc = json.loads(path.read_text())
    assert doc["simulated"] is True and doc["points"][0]["simulated_responses"] == point.ok
    assert doc["server"]["models"]["models"][0]["runtime"]["simulated"] is True
    back = load_result(path)
    assert back.simulated and back.points[0].simulated_responses == point.ok
    # results written before the field existed still validate and load
    for p in doc["points"]:
        del p["simulated_responses"]
    del doc["simulated"]
    assert validate(doc) == []
