"""``cvserve bench --protocol v2-http|v2-grpc`` against a real cvserve server that serves
/v1, KServe v2 over HTTP and v2 over gRPC in one process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import grpc
import httpx
import numpy as np
import pytest

from cvserve.bench import (
    BenchConfig,
    BenchError,
    BenchImage,
    ServerUnreachable,
    TargetNotServed,
    _grpc,
    _http,
    load_images,
    load_result,
    run_bench,
    v2,
    validate,
)
from cvserve.config import BatchConfig, ModelConfig, ServerConfig
from cvserve.images.preprocess import Preprocessor
from cvserve.models import store
from cvserve.serving.process import ServerThread, free_port
from cvserve.serving.v2.grpc import request_from_proto
from cvserve.serving.v2.http import parse_request
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc
from cvserve.trace import STAGES

MODEL = "tiny-resnet"
SERVER_STAGES = {"recv", "queue", "batch_wait", "infer", "postprocess", "encode"}
PREPROCESS = {"decode", "resize", "normalize"}
BROKEN = BenchImage("broken.jpg", b"\xff\xd8\xff" + bytes(100), "image/jpeg")


def _start(cache, **batching) -> ServerThread:
    config = ServerConfig(
        port=free_port(),
        grpc_port=0,
        cache_dir=str(cache),
        preprocess_threads=1,
        models=(ModelConfig(MODEL, batching=BatchConfig(**batching)),),
    )
    srv = ServerThread(config).start()
    deadline = time.monotonic() + 30
    while srv.server.grpc is None or not srv.server.started:  # gRPC binds after HTTP
        assert time.monotonic() < deadline, "the gRPC door did not start"
        time.sleep(0.02)
    return srv


@pytest.fixture(scope="module")
def server(model_cache):
    srv = _start(model_cache, max_batch_size=4, max_delay_ms=2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photos(data_dir) -> list[BenchImage]:
    return [im for im in load_images(data_dir / "images" / "small") if im.name.endswith(".jpg")][:3]


def _bench(server, images, **kw):
    kw.setdefault("url", server.url)
    config = BenchConfig(model=MODEL, images=images, concurrency=[2], requests=12, warmup=0.2, **kw)
    return run_bench(config)


def _check_ok(result, stages: set[str]) -> None:
    assert validate(json.loads(json.dumps(result.to_dict()))) == []
    (p,) = result.points
    assert p.requests == 12 and p.ok == 12 and p.errors["total"] == 0
    assert p.server_timing_missing == 0 and p.server_timing_malformed == 0
    assert stages <= set(p.breakdown_ms) <= set(STAGES)
    assert p.breakdown_ms["network"] >= 0 and p.breakdown_ms["infer"] > 0
    assert p.mean_response_bytes is not None and p.mean_response_bytes >= 40  # 10 FP32 logits


# --- runs against the real server ------------------------------------------------------
@pytest.mark.parametrize("protocol", ["v2-http", "v2-grpc"])
def test_image_as_bytes_input(server, photos, protocol):
    grpc_target = server.grpc_target if protocol == "v2-grpc" else None
    result = _bench(server, photos, protocol=protocol, grpc_target=grpc_target)
    _check_ok(result, SERVER_STAGES | PREPROCESS | {"network"})  # the server decoded
    assert result.config["protocol"] == protocol
    assert result.config["grpc_target"] == grpc_target
    assert result.server["input"] == {"name": "IMAGE", "datatype": "BYTES", "shape": [1]}
    assert result.server["outputs"] == ["logits"]


@pytest.mark.parametrize(
    ("protocol", "json_tensors"), [("v2-http", False), ("v2-http", True), ("v2-grpc", False)]
)
def test_input_tensor(server, photos, model_cache, protocol, json_tensors):
    url = f"grpc://{server.grpc_target}" if protocol == "v2-grpc" else server.url
    result = _bench(
        server, photos, url=url, protocol=protocol, input_tensor=True, json_tensors=json_tensors
    )
    _check_ok(result, SERVER_STAGES | {"network"})
    (p,) = result.points
    assert p.breakdown_ms.get("decode", 0.0) == 0.0  # pixels arrived preprocessed
    assert p.breakdown_ms.get("resize", 0.0) == 0.0
    meta = store.load_meta(MODEL, model_cache)
    assert result.server["input"] == {
        "name": meta.input_name,
        "datatype": "FP32",
        "shape": [1, *meta.preprocess.input_shape],
    }
    # over plain gRPC there is no /v1 description: the spec is assumed from the shape
    assert result.server["preprocess"]["from"] == (
        "assumed" if protocol == "v2-grpc" else "/v1/models"
    )
    assert result.config["json_tensors"] is json_tensors


def test_tensor_requests_answer_as_v1_does(server, photos, model_cache):
    """The pixels the bench sends (cvserve's spec from /v1, preprocessed client-side) give
    the logits /v1 computes from the encoded image."""
    target = _http.Target.from_url(server.url)
    meta = store.load_meta(MODEL, model_cache)
    shape = (1, *meta.preprocess.input_shape)
    inp = v2.V2Input(meta.input_name, "FP32", shape)
    rows = v2.preprocess_images(photos, meta.preprocess)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for im, row in zip(photos, rows, strict=True):
            raw = v2.http_request(target, MODEL, inp, row, ["logits"])
            head, _, body = raw.partition(b"\r\n\r\n")
            length = int(head.split(b"Inference-Header-Content-Length: ")[1].split(b"\r\n")[0])
            r = c.post(
                f"/v2/models/{MODEL}/infer",
                content=body,
                headers={v2.HEADER_LENGTH: str(length)},
            )
            assert r.status_code == 200, r.text
            n = int(r.headers[v2.HEADER_LENGTH])
            out = json.loads(r.content[:n])["outputs"][0]
            assert out["name"] == "logits" and out["parameters"]["binary_data_size"] == 40
            logits = np.frombuffer(r.content[n:], "<f4").astype(np.float64)
            v1 = c.post(f"/v1/models/{MODEL}:predict?top_k=10", content=im.data).json()["top_k"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            assert [t["index"] for t in v1] == order.tolist()
            np.testing.assert_allclose([t["score"] for t in v1], probs[order], rtol=1e-4, atol=1e-6)


def test_grpc_open_loop(server, photos):
    """Poisson arrivals over gRPC: each arrival takes an idle call slot or opens one."""
    config = BenchConfig(
        url=f"grpc://{server.grpc_target}", model=MODEL, images=photos, protocol="v2-grpc",
        rates=[100.0], requests=30, warmup=0.1, input_tensor=True,
    )  # fmt: skip
    (p,) = run_bench(config).points
    assert p.mode == "open" and p.requests == 30 and p.ok == 30 and p.dropped == 0
    assert p.server_timing_missing == 0 and p.send_lag_ms["mean"] >= 0


# --- the wire formats, read back by the server's own parsers --------------------------------
def test_requests_parse_as_the_server_reads_them(photos, model_cache):
    target = _http.Target.from_url("http://127.0.0.1:1")
    image = photos[0].data
    bytes_input = v2.V2Input("IMAGE", "BYTES", (1,))
    raw = v2.http_request(target, MODEL, bytes_input, image, ["logits"])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"POST /v2/models/{MODEL}/infer HTTP/1.1".encode())
    length = int(head.split(b"Inference-Header-Content-Length: ")[1].split(b"\r\n")[0])
    assert b"Content-Length: %d" % len(body) in head
    req = parse_request(body, length, model=MODEL)
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape, t.data) == ("IMAGE", "BYTES", [1], [image])
    assert [(o.name, o.binary) for o in req.outputs] == [("logits", True)]

    meta = store.load_meta(MODEL, model_cache)
    x = np.empty(meta.preprocess.input_shape, np.float32)
    Preprocessor(meta.preprocess).run(image, x)
    tensor_input = v2.V2Input(meta.input_name, "FP32", (1, *x.shape))
    for json_tensors in (False, True):
        raw = v2.http_request(target, MODEL, tensor_input, x, ["logits"], json_tensors)
        head, _, body = raw.partition(b"\r\n\r\n")
        has_length = b"Inference-Header-Content-Length" in head
        assert has_length is not json_tensors
        length = int(head.split(b"Length: ")[1].split(b"\r\n")[0]) if has_length else None
        (t,) = parse_request(body, length, model=MODEL).inputs
        assert t.shape == [1, *x.shape]
        np.testing.assert_array_equal(t.data[0], x)  # float32 survives JSON exactly

    msg = pb.ModelInferRequest.FromString(v2.grpc_request(MODEL, tensor_input, x, ["logits"]))
    req = request_from_proto(msg)
    assert req.model == MODEL and [o.name for o in req.outputs] == ["logits"]
    np.testing.assert_array_equal(req.inputs[0].data[0], x)
    msg = pb.ModelInferRequest.FromString(v2.grpc_request(MODEL, bytes_input, image, ["logits"]))
    assert request_from_proto(msg).inputs[0].data == [image]


# --- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["v2-http", "v2-grpc"])
def test_unknown_model_is_a_clear_error_at_probe_time(server, photos, protocol):
    url = f"grpc://{server.grpc_target}" if protocol == "v2-grpc" else server.url
    config = BenchConfig(url=url, model="no-such-model", images=photos, protocol=protocol)
    with pytest.raises(TargetNotServed, match="no-such-model") as e:
        run_bench(config)
    assert MODEL in str(e.value)  # the server's message says what it serves


@pytest.mark.parametrize("protocol", ["v2-http", "v2-grpc"])
def test_server_down_is_unreachable(photos, protocol):
    url = f"grpc://127.0.0.1:{free_port()}" if protocol == "v2-grpc" else "http://127.0.0.1:9"
    config = BenchConfig(url=url, model=MODEL, images=photos, protocol=protocol)
    with pytest.raises(ServerUnreachable, match="not ready"):
        run_bench(config)


def test_first_request_refused_is_the_servers_message(server, photos):
    config = BenchConfig(url=server.url, model=MODEL, images=[BROKEN], protocol="v2-http")
    with pytest.raises(BenchError, match=r"\(400\)"):
        run_bench(config)


def test_input_choice_errors(server, photos):
    with pytest.raises(BenchError, match="no input 'INPUT__0'.*IMAGE"):
        _bench(server, photos, protocol="v2-http", input_name="INPUT__0")
    with pytest.raises(
        BenchError, match="not BYTES"
    ):  # a tensor input, images without --input-tensor
        _bench(server, photos, protocol="v2-http", input_name="pixel_values")
    with pytest.raises(ValueError, match="json_tensors"):
        BenchConfig(
            url=server.url, model=MODEL, images=photos, protocol="v2-http", json_tensors=True
        )
    with pytest.raises(ValueError, match="grpc"):
        BenchConfig(url=server.url, model=MODEL, images=photos, protocol="v2-grpc")
    with pytest.raises(ValueError, match="grpc:// url needs protocol v2-grpc"):
        BenchConfig(url="grpc://127.0.0.1:1", model=MODEL, images=photos, protocol="v2-http")


def test_grpc_errors_during_the_run_are_counted_by_status(server, photos):
    """INVALID_ARGUMENT (an undecodable image) is counted as 400, as over HTTP."""
    result = _bench(server, [photos[0], BROKEN], protocol="v2-grpc", grpc_target=server.grpc_target)
    (p,) = result.points
    assert p.requests == 12 and p.ok + p.errors["by_status"]["400"] == 12
    assert 4 <= p.ok <= 8  # the two images alternate
    assert p.errors["by_kind"] == {}


def test_grpc_overload_is_429_with_retry_after(model_cache, photos):
    srv = _start(model_cache, max_batch_size=1, max_delay_ms=0, max_queue=1)
    try:
        config = BenchConfig(
            url=f"grpc://{srv.grpc_target}", model=MODEL, images=photos, protocol="v2-grpc",
            concurrency=[8], requests=40, warmup=0.0, honor_retry_after=False,
        )  # fmt: skip
        (p,) = run_bench(config).points
    finally:
        srv.stop()
    assert p.ok > 0 and p.errors["by_status"].get("429", 0) > 0
    assert set(p.errors["by_status"]) == {"429"}


class _SlowService(pb_grpc.GRPCInferenceServiceServicer):
    """Ready, describes one BYTES input, and never answers an inference in time."""

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        t = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            inputs=[t(name="IMAGE", datatype="BYTES", shape=[-1])],
            outputs=[t(name="out", datatype="FP32", shape=[-1, 1])],
        )

    async def ModelInfer(self, request, context):
        await asyncio.sleep(30)
        return pb.ModelInferResponse()


@pytest.fixture
def slow_grpc():
    ready = threading.Event()
    box: dict = {}

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(_SlowService(), server)
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await server.start()
        ready.set()
        await box["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"grpc://127.0.0.1:{box['port']}"
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


def test_grpc_calls_past_the_timeout_are_cancelled_and_counted_once(slow_grpc, photos):
    config = BenchConfig(
        url=slow_grpc, model="slow", images=photos, protocol="v2-grpc", concurrency=[2],
        duration=1.0, warmup=0.0, timeout=0.3,
    )  # fmt: skip
    result = run_bench(config)
    (p,) = result.points
    assert p.ok == 0 and p.errors["by_status"] == {}
    # each slot's call is cancelled at 0.3 s (+ a sweep tick), then the slot is reused:
    # at most 2 slots x 3 timeouts in 1 s; none waits for the server's 30 s
    assert p.errors["by_kind"] == {"timeout": p.requests} and 2 <= p.requests <= 8
    lat = result.rows["latency"][result.rows["measured"]]
    assert (lat >= 0.3).all() and (lat < 1.0).all()


def test_status_mapping():
    sc = grpc.StatusCode
    want = {
        sc.OK: 200, sc.INVALID_ARGUMENT: 400, sc.NOT_FOUND: 404, sc.RESOURCE_EXHAUSTED: 429,
        sc.UNAVAILABLE: 503, sc.DEADLINE_EXCEEDED: 504, sc.INTERNAL: 500, sc.UNKNOWN: 500,
        sc.CANCELLED: 500,
    }  # fmt: skip
    for code, status in want.items():
        assert _grpc.status_of(code, "x", True) == (status, _http.ERR_NONE)
    # no server answered: a transport failure, as over HTTP, not the server's 503
    refused = "failed to connect to all addresses; last error: UNKNOWN: Connection refused"
    assert _grpc.status_of(sc.UNAVAILABLE, refused, False) == (0, _http.ERR_CONNECT)
    assert _grpc.status_of(sc.UNAVAILABLE, "Socket closed", False) == (0, _http.ERR_PROTOCOL)
    assert _grpc.status_of(sc.UNAVAILABLE, "draining", True) == (503, _http.ERR_NONE)


# --- the command line -------------------------------------------------------------------
def test_cli_inprocess_grpc(model_cache, data_dir, tmp_path):
    out = tmp_path / "grpc.json"
    r = subprocess.run(
        [
            sys.executable, "-m", "cvserve", "bench", "--inprocess", "--model", MODEL,
            "--cache-dir", str(model_cache), "--protocol", "v2-grpc", "--input-tensor",
            "--images", str(data_dir / "images" / "small"), "--concurrency", "2",
            "--requests", "10", "--warmup-ms", "200", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(v2-grpc, input tensor)" in r.stdout  # the table's title says what was measured
    result = load_result(out)
    assert result.config["protocol"] == "v2-grpc" and result.config["input_tensor"] is True
    assert result.server["preprocess"]["from"] == "/v1/models"  # the in-process server's HTTP
    (p,) = result.points
    assert p.ok == 10 and p.server_timing_missing == 0 and "infer" in p.breakdown_ms
