"""Pipelines on the simulated accelerator: configuration, the answer's shape, each DNN's
time from its profile, and sim=1 wherever a simulated stage touched the request (also
when stage B ran in a `cvserve worker` process behind Redis)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from served import start_worker, stop_processes

from cvserve.cli import build_parser, server_config_from_args
from cvserve.config import ConfigError, PipelineConfig, ServerConfig, server_config_from_dict
from cvserve.runtime.simulated import SimProfile
from cvserve.serving.process import ServerThread, free_port
from cvserve.trace import parse_server_timing, server_timing_simulated

PARAMS = {"detector": "tiny-yolos", "classifier": "tiny-resnet", "objects": 3}
DET, CLS = "1:50", "1:100,16:130"  # ms: far above what the tiny models take for real


@pytest.fixture(scope="module")
def built(model_cache):
    from cvserve.models import store

    store.ensure_built("tiny-yolos", model_cache)
    return model_cache


def _photos(data_dir, n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_dir / "images" / "small").glob("*.jpg"))[:n]]


async def _burst(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(client.post("/v1/pipelines/dc:predict", content=b) for b in bodies)
        )


def _check_answer(r: httpx.Response) -> dict[str, float]:
    """A detect-classify answer of PARAMS' shape; returns its Server-Timing stages (s)."""
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["objects"]) == PARAMS["objects"]  # the simulated detector's boxes fan out
    w, h = body["image_size"]
    for obj in body["objects"]:
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert obj["label"].startswith("class_") and 0 <= obj["score"] <= 1
    timing = r.headers["server-timing"]
    assert server_timing_simulated(timing)
    stages, bad = parse_server_timing(timing)
    assert bad == 0 and {"decode", "infer", "broker"} <= set(stages)
    return stages


def test_config_file_and_flags_take_the_simulated_runtime():
    cfg = server_config_from_dict(
        {"pipelines": [{"name": "ocr", "runtime": "simulated", "sim_devices": 2,
                        "sim_profile": {"det": "1:5", "cls": "1:1", "rec": "1:2,8:6"}}]}
    )  # fmt: skip
    p = cfg.pipelines[0]
    assert (p.runtime, p.sim_devices, p.sim_profile["rec"]) == ("simulated", 2, "1:2,8:6")
    for entry, says in [
        ({"runtime": "simulated"}, "needs a latency profile"),
        ({"runtime": "simulated", "sim_profile": "1:0"}, "must be > 0"),
        ({"runtime": "simulated", "sim_profile": {"detector": "1:1"}}, "no DNN of this pipeline"),
        ({"runtime": "simulated", "sim_profile": "1:1", "sim_devices": 0}, "sim_devices"),
        ({"sim_profile": "1:1"}, "needs the simulated runtime"),
        ({"runtime": "tpu"}, "choose one of onnxruntime, simulated"),
    ]:
        with pytest.raises(ConfigError, match=says):
            server_config_from_dict({"pipelines": [{"name": "ocr", **entry}]})

    parser = build_parser()
    args = parser.parse_args(["serve", "--pipeline", "ocr", "--runtime", "simulated",
                              "--sim-profile", "1:3,8:9", "--sim-devices", "2"])  # fmt: skip
    p = server_config_from_args(args).pipelines[0]
    assert (p.runtime, p.sim_profile, p.sim_devices) == ("simulated", "1:3,8:9", 2)
    args = parser.parse_args(["serve", "--pipeline", "ocr", "--runtime", "simulated",
                              "--sim-profile", "1:3", "--sim-h2d-gbps", "10"])  # fmt: skip
    with pytest.raises(ConfigError, match="models only"):
        server_config_from_args(args)
    args = parser.parse_args(["worker", "--pipeline", "ocr", "--stage", "rec", "--broker",
                              "redis://x:1", "--runtime", "simulated", "--sim-profile", "1:4"])  # fmt: skip
    assert (args.runtime, args.sim_profile) == ("simulated", "1:4")


def test_both_stages_simulated_answer_in_shape_and_take_the_profiles_time(built, data_dir):
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(built),
        pipelines=(
            PipelineConfig("dc", kind="detect-classify", max_batch_size=16, block_ms=5,
                           params=PARAMS, runtime="simulated",
                           sim_profile={"det": DET, "cls": CLS}),
        ),
    )  # fmt: skip
    with ServerThread(cfg) as srv:
        responses = asyncio.run(_burst(srv.url, _photos(data_dir, 4)))
        described = httpx.get(f"{srv.url}/v1/pipelines").json()["pipelines"][0]["runtime"]
    det_ms = SimProfile.parse(DET).latency_s(1) * 1000
    cls_ms = SimProfile.parse(CLS).latency_s(1) * 1000
    for r in responses:
        stages = _check_answer(r)
        # infer = the detector's call + the classifier's batch of the last item: each at
        # least its profile's latency (they sleep that long), whatever else ran beside them
        assert stages["infer"] * 1000 >= det_ms + cls_ms - 0.5, stages
    assert described["simulated"] is True
    assert described["profiles"]["det"]["latency_ms"] == {"1": 50.0}
    assert described["profiles"]["cls"]["latency_ms"] == {"1": 100.0, "16": 130.0}


def test_a_simulated_worker_process_marks_the_answer_simulated(built, data_dir, redis_server):
    """Stage A on onnxruntime here, stage B on the simulated runtime in `cvserve worker`:
    only the results' header can tell the server that the request touched a simulation."""
    url = f"{redis_server.url}?prefix=s{free_port()}:"
    worker, started = start_worker(
        ["--pipeline", "dc", "--kind", "detect-classify", "--stage", "classify",
         "--broker", url, "--cache-dir", str(built), "--runtime", "simulated",
         "--sim-profile", CLS, *[a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]]
    )  # fmt: skip
    try:
        assert "SIMULATED" in started and "1:100,16:130" in started, started
        cfg = ServerConfig(
            port=free_port(),
            cache_dir=str(built),
            broker=url,
            pipelines=(
                PipelineConfig("dc", kind="detect-classify", block_ms=5, params=PARAMS,
                               stage_workers=0),
            ),
        )  # fmt: skip
        with ServerThread(cfg) as srv:
            responses = asyncio.run(_burst(srv.url, _photos(data_dir, 2)))
            described = httpx.get(f"{srv.url}/v1/pipelines").json()["pipelines"][0]["runtime"]
        assert described == {"kind": "onnxruntime", "simulated": False}
        cls_ms = SimProfile.parse(CLS).latency_s(1) * 1000
        for r in responses:
            stages = _check_answer(r)
            # the worker's batch, as its results reported it
            assert stages["infer"] * 1000 >= cls_ms - 0.5, stages
    finally:
        stop_processes(worker)
