"""The KServe v2 gRPC door, driven by Triton's own client (``tritonclient.grpc``, unmodified)
against a real server that also serves HTTP, in one process and one event loop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from bad_files import STATUS

from cvserve import __version__
from cvserve.config import BatchConfig, ConfigError, ModelConfig, ServerConfig
from cvserve.errors import RequestError
from cvserve.images.preprocess import Preprocessor
from cvserve.models import store
from cvserve.serving import errors
from cvserve.serving.process import ServerThread, free_port
from cvserve.serving.v2.grpc import decode_bytes, encode_bytes, grpc_status, request_from_proto
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc
from cvserve.trace import SERVER_STAGES, parse_server_timing

tg = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (test extra)")
tg_aio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import (  # noqa: E402
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
)

MODEL = "tiny-resnet"
SC = grpc.StatusCode


def _config(cache, **batching) -> ServerConfig:
    return ServerConfig(
        port=free_port(),
        grpc_port=0,  # any free port: ServerThread.grpc_target says which
        cache_dir=str(cache),
        preprocess_threads=2,
        max_body_bytes=4 * 1024 * 1024,
        models=(ModelConfig(MODEL, batching=BatchConfig(**batching)),),
    )


@pytest.fixture(scope="module")
def server(model_cache):
    srv = ServerThread(_config(model_cache, max_batch_size=8, max_delay_ms=20)).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with tg.InferenceServerClient(server.grpc_target) as c:
        yield c


@pytest.fixture(scope="module")
def photos(data_dir) -> list[bytes]:
    paths = sorted((data_dir / "images" / "small").glob("*.jpg"))[:3]
    assert len(paths) == 3
    return [p.read_bytes() for p in paths]


def _v1_top_k(server, data: bytes) -> list[dict]:
    r = httpx.post(f"{server.url}/v1/models/{MODEL}:predict?top_k=10", content=data, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["top_k"]


def _images_input(images: list[bytes]):
    inp = tg.InferInput("IMAGE", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object))
    return inp


def _pixels(cache, data: bytes) -> np.ndarray:
    """cvserve's own preprocessing of one image: a [1, 3, H, W] float32 batch."""
    meta = store.load_meta(MODEL, cache)
    x = np.empty((1, *meta.preprocess.input_shape), np.float32)
    Preprocessor(meta.preprocess).run(data, x[0])
    return x


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return np.exp(z) / np.exp(z).sum()


def _code(e: InferenceServerException) -> str:
    return e.status()  # tritonclient gives "StatusCode.NAME"


# --- health and metadata ------------------------------------------------------------------
def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    for name, version in (("no-such-model", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as e:  # as Triton: an error, not False
            client.is_model_ready(name, version)
        assert _code(e.value) == "StatusCode.NOT_FOUND"
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "cvserve"
    assert meta["version"] == __version__
    assert {"classification", "statistics"} <= set(meta["extensions"])


def test_model_metadata_describes_the_served_model(server, client, model_cache):
    meta = client.get_model_metadata(MODEL, as_json=True)
    stored = store.load_meta(MODEL, model_cache)
    assert meta["name"] == MODEL
    assert meta["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {
        "IMAGE": ("BYTES", [-1]),
        stored.input_name: ("FP32", [-1, *stored.preprocess.input_shape]),
    }
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert outputs == {"logits": ("FP32", [-1, len(stored.labels)])}
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert _code(e.value) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata(MODEL, "7")
    assert _code(e.value) == "StatusCode.NOT_FOUND"


# --- inference ----------------------------------------------------------------------------
def test_bytes_images_give_v1s_answers(server, client, photos):
    result = client.infer(MODEL, [_images_input(photos)])
    logits = result.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    for data, row in zip(photos, logits, strict=True):
        want = _v1_top_k(server, data)
        probs = _softmax(row)
        order = np.argsort(-probs, kind="stable")
        assert int(order[0]) == want[0]["index"]
        np.testing.assert_allclose(
            probs[[t["index"] for t in want]], [t["score"] for t in want], rtol=1e-4, atol=1e-6
        )
    response = result.get_response()
    assert response.model_name == MODEL and response.model_version == "1"


def test_raw_fp32_tensor_gives_v1s_answer(server, client, model_cache, photos):
    x = _pixels(model_cache, photos[1])
    inp = tg.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    logits = client.infer(MODEL, [inp], request_id="raw-1")
    assert logits.get_response().id == "raw-1"
    row = logits.as_numpy("logits")[0]
    want = _v1_top_k(server, photos[1])
    np.testing.assert_allclose(
        _softmax(row)[[t["index"] for t in want]], [t["score"] for t in want], rtol=1e-4, atol=1e-6
    )
    # the same tensor in InferTensorContents instead of raw_input_contents
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="pixel_values", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc_target) as ch:
        reply = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert [o.name for o in reply.outputs] == ["logits"]
    got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(got[0], row, rtol=1e-5, atol=1e-6)


def test_classification_extension(server, client, model_cache, photos):
    out = tg.InferRequestedOutput("logits", class_count=3)
    classes = client.infer(MODEL, [_images_input(photos)], outputs=[out]).as_numpy("logits")
    assert classes.shape == (3, 3)
    logits = client.infer(MODEL, [_images_input(photos)]).as_numpy("logits")
    labels = store.load_meta(MODEL, model_cache).labels
    for data, row, strings in zip(photos, logits, classes, strict=True):
        top = np.argsort(-row.astype(np.float64), kind="stable")[:3]
        parsed = [s.decode().split(":") for s in strings]  # "score:index:label", as Triton
        assert [int(p[1]) for p in parsed] == top.tolist()
        assert [p[2] for p in parsed] == [labels[i] for i in top]
        np.testing.assert_allclose([float(p[0]) for p in parsed], row[top], atol=1e-6)
        assert int(parsed[0][1]) == _v1_top_k(server, data)[0]["index"]


def test_aio_client(server, photos):
    async def run():
        async with tg_aio.InferenceServerClient(server.grpc_target) as c:
            assert await c.is_server_live()
            assert await c.is_server_ready()
            assert await c.is_model_ready(MODEL)
            meta = await c.get_model_metadata(MODEL, as_json=True)
            calls = []
            for data in photos:
                inp = tg.InferInput("IMAGE", [1], "BYTES")
                inp.set_data_from_numpy(np.array([data], dtype=object))
                calls.append(c.infer(MODEL, [inp]))
            results = await asyncio.gather(*calls)
            return meta, [r.as_numpy("logits")[0] for r in results]

    meta, rows = asyncio.run(run())
    assert meta["name"] == MODEL
    for data, row in zip(photos, rows, strict=True):
        assert int(np.argmax(row)) == _v1_top_k(server, data)[0]["index"]


# --- errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.BadRequest("x"), SC.INVALID_ARGUMENT),
        (errors.NotServed("x"), SC.NOT_FOUND),
        (errors.BodyTooLarge("x"), SC.INVALID_ARGUMENT),
        (errors.UnsupportedMediaType("x"), SC.INVALID_ARGUMENT),
        (errors.Overloaded("x", retry_after_s=1), SC.RESOURCE_EXHAUSTED),
        (errors.Draining("x"), SC.UNAVAILABLE),
        (errors.BrokerDown("x"), SC.UNAVAILABLE),
        (errors.DeadlineExceeded("x"), SC.DEADLINE_EXCEEDED),
        (errors.InferenceFailed("x"), SC.INTERNAL),
        (errors.StageFailed("x"), SC.INTERNAL),
        (RequestError("x"), SC.INTERNAL),
        (ValueError("x"), SC.INTERNAL),
    ],
)
def test_status_mapping(error, code):
    assert grpc_status(error) == code


def test_errors_get_tritons_status_codes(server, client, model_cache, photos):
    with pytest.raises(InferenceServerException) as e:
        client.infer("no-such-model", [_images_input(photos[:1])])
    assert _code(e.value) == "StatusCode.NOT_FOUND"
    assert "no-such-model" in e.value.message()

    wrong = np.zeros((1, 3, 16, 16), np.float32)  # the model takes [N, 3, 32, 32]
    inp = tg.InferInput("pixel_values", list(wrong.shape), "FP32")
    inp.set_data_from_numpy(wrong)
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [inp])
    assert _code(e.value) == "StatusCode.INVALID_ARGUMENT"
    assert "[N, 3, 32, 32]" in e.value.message()

    # raw bytes that do not fill the declared shape
    req = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\0" * 100])
    req.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 3, 32, 32])
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as r:
            stub.ModelInfer(req, timeout=30)
        assert r.value.code() == SC.INVALID_ARGUMENT and "12288 bytes" in r.value.details()
        # a message over max_body_bytes is refused by gRPC itself
        big = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[b"\0" * (5 << 20)])
        big.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
        with pytest.raises(grpc.RpcError) as r:
            stub.ModelInfer(big, timeout=30)
        assert r.value.code() == SC.RESOURCE_EXHAUSTED

    # Triton's request timeout (microseconds): the server's own DEADLINE_EXCEEDED
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [_images_input(photos[:1])], timeout=1)
    assert _code(e.value) == "StatusCode.DEADLINE_EXCEEDED"


def test_bad_images_map_like_http(client, data_dir):
    codes = {400: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT"}
    picked = {}
    for name, status in STATUS.items():
        if status in codes and status not in picked.values():
            picked[name] = status
    assert set(picked.values()) == set(codes)
    for name, status in picked.items():
        data = (data_dir / "bad" / name).read_bytes()
        with pytest.raises(InferenceServerException) as e:
            client.infer(MODEL, [_images_input([data])])
        assert _code(e.value) == f"StatusCode.{codes[status]}", name


# --- statistics, metrics and stage times ----------------------------------------------------
def test_statistics_count_grpc_requests(server, client, photos):
    def stats():
        (s,) = client.get_inference_statistics(MODEL).model_stats
        return s

    before = stats()
    client.infer(MODEL, [_images_input(photos)])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_images_input([b"not an image"])])
    after = stats()
    assert after.name == MODEL and after.version == "1"
    inf, was = after.inference_stats, before.inference_stats
    assert inf.success.count == was.success.count + 1
    assert inf.fail.count == was.fail.count + 1
    # Triton counts inferences per image: the request carried len(photos) of them
    assert after.inference_count == before.inference_count + len(photos)
    assert after.execution_count > before.execution_count  # the 3 images ran in batches
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(inf, field).count == inf.success.count
        assert getattr(inf, field).ns >= getattr(was, field).ns
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count
    # the same numbers the core keeps, whichever door asks
    core = server.state.models[MODEL].stats.to_triton()
    assert int(core["inference_stats"]["success"]["count"]) == inf.success.count
    every = client.get_inference_statistics().model_stats
    assert [s.name for s in every] == [MODEL]
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no-such-model")
    assert _code(e.value) == "StatusCode.NOT_FOUND"
    reg = server.state.metrics.registry
    ok = reg.get_sample_value("cvserve_requests_total", {"model": MODEL, "status": "200"})
    assert ok is not None and ok >= inf.success.count


def test_server_timing_in_trailing_metadata(server, photos):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            req = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[encode_bytes(photos)])
            req.inputs.add(name="IMAGE", datatype="BYTES", shape=[3])
            t0 = time.perf_counter()
            call = stub.ModelInfer(req, timeout=30)
            reply = await call
            secs = time.perf_counter() - t0
            ok = dict(await call.trailing_metadata())
            bad = pb.ModelInferRequest(model_name=MODEL)
            bad.inputs.add(
                name="IMAGE", datatype="BYTES", shape=[1]
            ).contents.bytes_contents.append(b"junk")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(bad, timeout=30)
            live = stub.ServerLive(pb.ServerLiveRequest(), timeout=30)
            await live
            return reply, ok, secs, e.value, dict(await live.trailing_metadata())

    reply, trailing, secs, error, live = asyncio.run(run())
    assert reply.outputs[0].name == "logits"
    stages, malformed = parse_server_timing(trailing["server-timing"])
    assert malformed == 0 and set(stages) <= set(SERVER_STAGES)
    assert {"recv", "queue", "decode", "resize", "normalize", "batch_wait", "infer"} <= set(stages)
    assert {"postprocess", "encode"} <= set(stages)
    assert sum(stages.values()) <= secs
    assert error.code() == SC.INVALID_ARGUMENT
    failed, _ = parse_server_timing(dict(error.trailing_metadata())["server-timing"])
    assert "recv" in failed and "decode" in failed
    assert set(parse_server_timing(live["server-timing"])[0]) == {"encode"}


# --- the wire format ------------------------------------------------------------------------
def _same_message(mine, ref) -> int:
    """Every field of ``mine`` is in ``ref`` with the same number, type, cardinality, oneof
    and message type (recursively); returns how many fields were compared."""
    assert mine.full_name == ref.full_name
    compared = 0
    for f in mine.fields:
        r = ref.fields_by_name.get(f.name)
        assert r is not None, f"{mine.full_name}.{f.name} is not in Triton's proto"
        where = f"{mine.full_name}.{f.name}"
        assert (f.number, f.type, f.is_repeated) == (r.number, r.type, r.is_repeated), where
        oneof = (
            f.containing_oneof and f.containing_oneof.name,
            r.containing_oneof and r.containing_oneof.name,
        )
        assert oneof[0] == oneof[1], where
        if f.message_type is not None:
            compared += _same_message(f.message_type, r.message_type)
        compared += 1
    return compared


def test_proto_is_wire_compatible_with_tritons():
    """cvserve's proto against the one tritonclient ships (Triton's full grpc_service.proto):
    same package, service, methods, messages, field numbers and types."""
    from tritonclient.grpc import service_pb2 as triton

    assert pb.DESCRIPTOR.package == triton.DESCRIPTOR.package == "inference"
    (service,) = pb.DESCRIPTOR.services_by_name.values()
    ref = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == ref.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStatistics",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip
    for m in service.methods:
        r = ref.methods_by_name[m.name]
        _same_message(m.input_type, r.input_type)
        _same_message(m.output_type, r.output_type)
        assert not (m.client_streaming or m.server_streaming or r.server_streaming)
    total = sum(_same_message(d, triton.DESCRIPTOR.message_types_by_name[n])
                for n, d in pb.DESCRIPTOR.message_types_by_name.items())  # fmt: skip
    assert total > 60  # the comparison really walked the messages


def test_stubs_are_generated_from_the_proto(tmp_path):
    """The checked-in stubs are what ``regenerate.py`` makes (where grpcio-tools is here)."""
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools==1.81.1 (regenerate.py)")
    from importlib.metadata import version

    from cvserve.serving.v2.proto import regenerate

    if version("grpcio-tools") != regenerate.GRPC_TOOLS_VERSION:
        pytest.skip(f"needs grpcio-tools=={regenerate.GRPC_TOOLS_VERSION}")
    for path in regenerate.generate(tmp_path):
        checked_in = Path(pb.__file__).parent / path.name
        assert path.read_text() == checked_in.read_text(), f"{path.name}: run regenerate.py"


def test_bytes_encoding_matches_tritonclient():
    items = [b"", b"a", b"\0\1\2" * 100, "é".encode()]
    ref = serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert encode_bytes(items) == ref
    assert decode_bytes(ref, "x") == items
    assert list(deserialize_bytes_tensor(encode_bytes(items))) == items
    for cut in (ref[:2], ref[:-1]):
        with pytest.raises(errors.BadRequest):
            decode_bytes(cut, "x")


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("INT8", "int_contents", [-128, 0, 127]),
        ("UINT16", "uint_contents", [0, 65535, 7]),
        ("INT64", "int64_contents", [-(2**40), 0, 2**40]),
        ("FP64", "fp64_contents", [0.5, -1e300, 3.25]),
        ("BOOL", "bool_contents", [True, False, True]),
    ],
)
def test_contents_and_raw_decode_alike(datatype, field, values):
    """A tensor sent in InferTensorContents equals the same tensor sent raw, built by
    tritonclient's own InferInput."""
    from tritonclient.utils import triton_to_np_dtype

    arr = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(1, 3)
    ti = tg.InferInput("t", [1, 3], datatype)
    ti.set_data_from_numpy(arr)
    raw = pb.ModelInferRequest(raw_input_contents=[ti._get_content()])
    raw.inputs.add().CopyFrom(pb.ModelInferRequest.InferInputTensor.FromString(
        ti._get_tensor().SerializeToString()
    ))  # fmt: skip
    by_contents = pb.ModelInferRequest()
    t = by_contents.inputs.add(name="t", datatype=datatype, shape=[1, 3])
    getattr(t.contents, field).extend(values)
    a, b = request_from_proto(raw).inputs[0], request_from_proto(by_contents).inputs[0]
    assert a.data.dtype == b.data.dtype == arr.dtype
    np.testing.assert_array_equal(a.data, arr)
    np.testing.assert_array_equal(b.data, arr)
    if datatype == "INT8":  # a value that does not fit is refused, not wrapped
        t.contents.int_contents[0] = 300
        with pytest.raises(errors.BadRequest):
            request_from_proto(by_contents)


def test_grpc_port_config():
    assert ServerConfig().grpc_port is None
    with pytest.raises(ConfigError):
        ServerConfig(port=9000, grpc_port=9000)
    with pytest.raises(ConfigError):
        ServerConfig(grpc_port=70000)
    from cvserve.cli import build_parser, server_config_from_args

    args = build_parser().parse_args(["serve", "--model", MODEL, "--grpc-port", "8001"])
    assert server_config_from_args(args).grpc_port == 8001


# --- a slow (simulated) model: deadlines, overload, draining --------------------------------
SLOW = ["--runtime", "simulated", "--sim-profile", "1:3000", "--max-batch-size", "1"]  # 3 s a batch


@pytest.fixture(scope="module")
def slow_server(model_cache):
    cfg = _config(model_cache, max_batch_size=1, max_queue=1)
    model = ModelConfig(MODEL, batching=cfg.models[0].batching, runtime="simulated",
                        sim_profile="1:1500,8:1500")  # fmt: skip
    from dataclasses import replace

    srv = ServerThread(replace(cfg, models=(model,))).start()
    yield srv
    srv.stop()


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_client_deadline_is_the_request_deadline(slow_server, photos):
    reg = slow_server.state.metrics.registry

    def timeouts() -> float:
        return (
            reg.get_sample_value("cvserve_requests_total", {"model": MODEL, "status": "504"}) or 0
        )

    before = timeouts()
    with tg.InferenceServerClient(slow_server.grpc_target) as c:
        with pytest.raises(InferenceServerException) as e:
            c.infer(MODEL, [_images_input(photos[:1])], client_timeout=0.3)
    assert _code(e.value) == "StatusCode.DEADLINE_EXCEEDED"
    _wait(lambda: slow_server.state.inflight == 0)
    assert timeouts() == before + 1  # the server gave up on it too, as a 504


def test_overload_is_resource_exhausted(slow_server, photos):
    with tg.InferenceServerClient(slow_server.grpc_target) as c:
        done: list = []
        first = threading.Thread(
            target=lambda: done.append(c.infer(MODEL, [_images_input(photos[:1])]))
        )
        first.start()
        _wait(lambda: slow_server.state.models[MODEL].inflight == 1)
        with pytest.raises(InferenceServerException) as e:
            c.infer(MODEL, [_images_input(photos[1:2])])
        first.join(30)
    assert _code(e.value) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "max_queue=1" in e.value.message()
    assert done and done[0].as_numpy("logits").shape == (1, 10)


def test_sigterm_drains_grpc_too(model_cache, photos, tmp_path):
    port, gport = free_port(), free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvserve", "serve", "--model", MODEL, "--port", str(port),
         "--grpc-port", str(gport), "--cache-dir", str(model_cache), *SLOW],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    target = f"127.0.0.1:{gport}"
    try:
        c = tg.InferenceServerClient(target)

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return c.is_server_ready()
            except InferenceServerException:
                return False

        _wait(ready, 120)
        done: list = []
        inflight = threading.Thread(
            target=lambda: done.append(c.infer(MODEL, [_images_input(photos[:1])]))
        )
        inflight.start()

        def queued() -> bool:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return f'cvserve_queue_depth{{model="{MODEL}"}} 1.0' in text

        _wait(queued)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: not c.is_server_ready())  # draining: not ready, still answering
        assert c.is_server_live()
        with pytest.raises(InferenceServerException) as e:
            c.infer(MODEL, [_images_input(photos[1:2])])
        assert _code(e.value) == "StatusCode.UNAVAILABLE"
        assert "shutting down" in e.value.message()
        inflight.join(30)
        assert done and done[0].as_numpy("logits").shape == (1, 10)  # it finished
        assert proc.wait(30) == 0
        with pytest.raises(InferenceServerException) as e:
            c.is_server_live()  # and the gRPC server is gone with the process
        assert _code(e.value) == "StatusCode.UNAVAILABLE"
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert f"ready on grpc://127.0.0.1:{gport}" in (tmp_path / "serve.log").read_text()


def test_invalid_protobuf_is_invalid_argument(server):
    """Issue 20 #10: bytes that are no ModelInferRequest are the client's error, not UNKNOWN."""
    with grpc.insecure_channel(server.grpc_target) as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, out
        for junk in (b"\xff\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"):
            with pytest.raises(grpc.RpcError) as e:
                raw(junk, timeout=10)
            assert e.value.code() == SC.INVALID_ARGUMENT, e.value.details()
            assert "protobuf" in e.value.details()


def test_concurrent_calls_are_bounded(model_cache, monkeypatch):
    """Issue 20 #1: past the limit a call is RESOURCE_EXHAUSTED at once, whatever it sends;
    the calls in flight (here two whose message never comes) are not disturbed."""
    from cvserve.serving.v2 import grpc as door

    monkeypatch.setattr(door, "MAX_CONCURRENT_RPCS", 2, raising=False)  # main had none
    srv = ServerThread(_config(model_cache)).start()
    release = threading.Event()

    def stalled():
        release.wait(30)
        yield pb.ServerLiveRequest().SerializeToString()

    try:
        with grpc.insecure_channel(srv.grpc_target) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            live = ch.stream_unary("/inference.GRPCInferenceService/ServerLive")
            held = [live.future(stalled(), timeout=60) for _ in range(2)]
            codes = set()
            for _ in range(100):  # until both stalled calls are in (in order, one connection)
                try:
                    stub.ServerLive(pb.ServerLiveRequest(), timeout=10)
                except grpc.RpcError as e:
                    codes.add(e.code())
                    break
                time.sleep(0.05)
            assert codes == {SC.RESOURCE_EXHAUSTED}
            release.set()
            assert [f.result(timeout=30) for f in held]  # the held calls were answered
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    finally:
        release.set()
        srv.stop()
