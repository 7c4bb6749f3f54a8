"""KServe v2 over HTTP against a real server, driven by ``tritonclient.http`` unmodified:
the answers must be /v1's answers for the same images."""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import httpx
import numpy as np
import pytest

from cvserve.images.preprocess import Preprocessor
from cvserve.models import store
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.base import softmax
from cvserve.trace import SERVER_STAGES, parse_server_timing

th = pytest.importorskip("tritonclient.http", reason="needs the test extra (tritonclient[http])")
aio = pytest.importorskip("tritonclient.http.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "tiny-resnet"
HEADER = "Inference-Header-Content-Length"
PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg")


@pytest.fixture(scope="module")
def photos(data_dir) -> list[bytes]:
    return [(data_dir / "images" / "small" / n).read_bytes() for n in PHOTOS]


@pytest.fixture(scope="module")
def client(server):
    c = th.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def v1(server, photos) -> list[list[dict]]:
    """/v1's top-k (all 10 classes) for each photo."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        out = []
        for data in photos:
            r = c.post(f"/v1/models/{MODEL}:predict?top_k=10", content=data)
            assert r.status_code == 200, r.text
            out.append(r.json()["top_k"])
        return out


def _images(photos: list[bytes], shape: list[int] | None = None, binary: bool = True):
    arr = np.array(photos, dtype=object).reshape(shape or [len(photos)])
    inp = th.InferInput("IMAGE", list(arr.shape), "BYTES")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def _text(s: bytes | str) -> str:
    """A BYTES element as tritonclient gives it: bytes from binary data, str from JSON."""
    return s.decode() if isinstance(s, bytes) else s


def _assert_matches_v1(logits: np.ndarray, v1_topk: list[dict]) -> None:
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, kind="stable")
    assert [t["index"] for t in v1_topk] == order.tolist()
    np.testing.assert_allclose([t["score"] for t in v1_topk], probs[order], rtol=1e-4, atol=1e-6)


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "cvserve"
    assert {"classification", "binary_tensor_data", "statistics"} <= set(meta["extensions"])
    want = {
        "name": MODEL,
        "versions": ["1"],
        "platform": "cvserve",
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get_model_metadata(MODEL) == want
    assert client.get_model_metadata(MODEL, "1") == want
    for name, version in (("nope", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata(name, version)
        assert err.value.status() == "404" and repr(name if version == "" else version) in str(
            err.value
        )


@pytest.mark.parametrize("shape", [None, [3, 1]])
def test_a_batch_of_encoded_images_answers_like_v1(client, photos, v1, shape):
    outputs = [th.InferRequestedOutput("logits", binary_data=True)]
    r = client.infer(MODEL, [_images(photos, shape)], outputs=outputs, request_id="abc")
    assert r.get_response()["id"] == "abc" and r.get_response()["model_version"] == "1"
    logits = r.as_numpy("logits")
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    for row, want in zip(logits, v1, strict=True):
        _assert_matches_v1(row, want)


def test_classification_strings_are_tritons_format(client, photos, v1):
    outputs = [th.InferRequestedOutput("logits", binary_data=False, class_count=4)]
    r = client.infer(MODEL, [_images(photos)], outputs=outputs)
    out = r.get_output("logits")
    assert out["datatype"] == "BYTES" and out["shape"] == [3, 4] and "data" in out
    strings = r.as_numpy("logits")
    raw = client.infer(MODEL, [_images(photos)]).as_numpy("logits")
    for row, logits, want in zip(strings, raw, v1, strict=True):
        parsed = [_text(s).split(":") for s in row]
        assert [int(p[1]) for p in parsed] == [t["index"] for t in want[:4]]
        assert [p[2] for p in parsed] == [t["label"] for t in want[:4]]
        # Triton's score: the output's own value, printed like std::to_string (6 decimals)
        assert [p[0] for p in parsed] == [f"{logits[int(p[1])]:f}" for p in parsed]
    # k past the row size: the whole row, in order
    big = [th.InferRequestedOutput("logits", class_count=50)]
    r = client.infer(MODEL, [_images(photos[:1])], outputs=big)
    assert r.as_numpy("logits").shape == (1, 10)


def test_a_preprocessed_tensor_skips_preprocessing_and_answers_like_v1(
    client, photos, v1, model_cache
):
    meta = store.load_meta(MODEL, model_cache)
    pre = Preprocessor(meta.preprocess)
    x = np.empty((len(photos), *meta.preprocess.input_shape), np.float32)
    for i, data in enumerate(photos):
        pre.run(data, x[i])
    via_bytes = client.infer(MODEL, [_images(photos)]).as_numpy("logits")
    for binary in (True, False):
        inp = th.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [th.InferRequestedOutput("logits", binary_data=binary)]
        r = client.infer(MODEL, [inp], outputs=outputs)
        assert ("data" in r.get_output("logits")) is not binary
        logits = r.as_numpy("logits")
        np.testing.assert_allclose(logits, via_bytes, rtol=1e-5, atol=1e-6)
        for row, want in zip(logits, v1, strict=True):
            _assert_matches_v1(row, want)


def test_request_parameters_reach_the_head_and_unknown_ones_are_400(client, photos):
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [_images(photos[:1])], parameters={"top_kk": 3})
    assert err.value.status() == "400" and "top_kk" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [_images(photos[:1])], parameters={"top_k": 0})
    assert err.value.status() == "400" and "top_k" in err.value.message()
    ok = client.infer(MODEL, [_images(photos[:1])], parameters={"top_k": 3}, priority=1)
    assert ok.as_numpy("logits").shape == (1, 10)
    # Triton's timeout parameter (microseconds) shortens the deadline: 1 us has passed
    # before any image is preprocessed
    _raises("504", "deadline", client.infer, MODEL, [_images(photos[:1])], timeout=1)
    _raises("400", "timeout", client.infer, MODEL, [_images(photos[:1])], timeout=0)
    assert client.infer(MODEL, [_images(photos[:1])], timeout=60_000_000).as_numpy("logits").size


def _raises(status: str, says: str, fn, *args, **kwargs) -> None:
    with pytest.raises(InferenceServerException) as err:
        fn(*args, **kwargs)
    assert err.value.status() == status, err.value
    assert says in err.value.message(), err.value.message()


def test_bad_requests_are_400_naming_the_field_and_reach_no_runtime(client, server, photos):
    stats = server.state.models[MODEL].stats
    batches = dict(stats.batches)

    def tensor(name, shape, datatype="FP32", dtype=np.float32):
        inp = th.InferInput(name, shape, datatype)
        inp.set_data_from_numpy(np.zeros(shape, dtype))
        return inp

    _raises("404", "no model named 'nope'", client.infer, "nope", [_images(photos[:1])])
    _raises("404", "no version '7'", client.infer, MODEL, [_images(photos[:1])], model_version="7")
    _raises(
        "400", "shape [2, 3, 32, 31]", client.infer, MODEL, [tensor("pixel_values", [2, 3, 32, 31])]
    )
    _raises("400", "[N, 3, 32, 32]", client.infer, MODEL, [tensor("pixel_values", [3, 32, 32])])
    _raises("400", "datatype FP64, tiny-resnet takes FP32", client.infer, MODEL,
            [tensor("pixel_values", [1, 3, 32, 32], "FP64", np.float64)])  # fmt: skip
    _raises(
        "400", "unknown input 'pixels'", client.infer, MODEL, [tensor("pixels", [1, 3, 32, 32])]
    )
    _raises("400", "send exactly one input", client.infer, MODEL,
            [_images(photos[:1]), tensor("pixel_values", [1, 3, 32, 32])])  # fmt: skip
    _raises("400", "shape [N] or [N,1]", client.infer, MODEL, [_images(photos[:2], [1, 2])])
    _raises("400", "unknown output 'probs'", client.infer, MODEL, [_images(photos[:1])],
            outputs=[th.InferRequestedOutput("probs")])  # fmt: skip
    _raises("400", "sequence", client.infer, MODEL, [_images(photos[:1])], sequence_id=5)
    assert stats.batches == batches  # nothing above ran the model
    # a broken image: /v1's status, naming its index; its batch-mates were fine
    _raises("415", "IMAGE[1]", client.infer, MODEL, [_images([photos[0], b"not an image"])])
    _raises("400", "IMAGE[0]", client.infer, MODEL, [_images([photos[0][:2000], photos[1]])])
    assert client.is_server_ready()


def test_wire_errors_have_the_v2_shape_and_every_answer_has_server_timing(server, photos):
    url = f"/v2/models/{MODEL}/infer"
    past = json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                     "parameters": {"binary_data_size": 99}}]}
    ).encode()  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=60) as c:
        cases = [
            (c.post(url, content=b"{nope"), 400, "not valid JSON"),
            (c.post(url, content=b'{"inputs": []}'), 400, "exactly one input"),
            (
                c.post(url, content=past + b"1234", headers={HEADER: str(len(past))}),
                400,
                "binary_data_size 99 runs past the body (4 bytes",
            ),
            (c.post(url, content=past, headers={HEADER: "1000"}), 400, HEADER),
            (c.post(url, content=b"{}", headers={HEADER: "x"}), 400, "byte count"),
            (c.post(url, content=b"{}", headers={"Content-Encoding": "br"}), 415, "br"),
            (c.post(url, content=b"{}", headers={"x-timeout-ms": "-1"}), 400, "x-timeout-ms"),
            (c.post("/v2/models/nope/infer", content=b"{}"), 404, "nope"),
            (c.get("/v2/models/nope"), 404, "nope"),
            (c.get("/v2/models/nope/stats"), 404, "nope"),
            (c.post(url, content=b"x" * (4 * 1024 * 1024 + 1)), 413, "limit"),
            (c.get(url), 405, "Method Not Allowed"),  # routing's own errors: v2 shape too
            (c.get(f"/v2/models/{MODEL}/config"), 404, "Not Found"),
        ]
        for r, status, says in cases:
            assert r.status_code == status, r.text
            assert set(r.json()) == {"error"} and says in r.json()["error"], r.text
            _, bad = parse_server_timing(r.headers["server-timing"])
            assert bad == 0
        for path in ("/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}",
                     f"/v2/models/{MODEL}/ready", "/v2/models/stats"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 200 and "encode" in r.headers["server-timing"], path
        body = json.dumps(
            {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                         "parameters": {"binary_data_size": 4 + len(photos[0])}}]}
        ).encode()  # fmt: skip
        t0 = time.perf_counter()
        r = c.post(
            url,
            content=body + len(photos[0]).to_bytes(4, "little") + photos[0],
            headers={HEADER: str(len(body))},
        )
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200 and "inference-header-content-length" not in r.headers
        assert np.asarray(r.json()["outputs"][0]["data"]).shape == (10,)
        stages, bad = parse_server_timing(r.headers["server-timing"])
        assert bad == 0 and set(stages) <= set(SERVER_STAGES)
        assert {"recv", "decode", "resize", "normalize", "batch_wait", "infer", "encode"} <= set(
            stages
        )
        assert sum(stages.values()) <= elapsed


def test_compressed_requests(client, photos, v1):
    for algorithm in ("gzip", "deflate"):
        r = client.infer(MODEL, [_images(photos)], request_compression_algorithm=algorithm)
        for row, want in zip(r.as_numpy("logits"), v1, strict=True):
            _assert_matches_v1(row, want)


def test_a_compression_bomb_is_413(server):
    bomb = gzip.compress(b"{" + b" " * (5 * 1024 * 1024) + b"}")
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        content=bomb,
        headers={"Content-Encoding": "gzip"},
        timeout=60,
    )
    assert r.status_code == 413 and "inflated" in r.json()["error"]


def test_statistics_count_the_requests(client, photos):
    def success() -> int:
        (entry,) = client.get_inference_statistics(MODEL)["model_stats"]
        assert entry["name"] == MODEL and entry["version"] == "1"
        return entry["inference_stats"]["success"]["count"]

    before = success()
    for _ in range(3):
        client.infer(MODEL, [_images(photos[:2])])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_images([b"junk"])])
    assert success() == before + 3
    every = client.get_inference_statistics()["model_stats"]
    assert [e["name"] for e in every] == [MODEL]
    one = client.get_inference_statistics(MODEL, "1")["model_stats"][0]
    stats = one["inference_stats"]
    assert stats["fail"]["count"] >= 1
    for field in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[field]["count"] == stats["success"]["count"] and stats[field]["ns"] > 0
    assert one["execution_count"] >= 1 and one["batch_stats"]


def test_the_asyncio_client(server, photos, v1):
    async def run():
        async with aio.InferenceServerClient(server.url.removeprefix("http://")) as c:
            assert await c.is_server_live() and await c.is_model_ready(MODEL)
            meta = await c.get_model_metadata(MODEL)
            assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
            results = await asyncio.gather(
                *(c.infer(MODEL, [_images([p])]) for p in photos),
                c.infer(
                    MODEL,
                    [_images(photos)],
                    outputs=[th.InferRequestedOutput("logits", class_count=1)],
                ),
            )
            with pytest.raises(InferenceServerException) as err:
                await c.infer("nope", [_images(photos[:1])])
            assert err.value.status() == "404"
            stats = await c.get_inference_statistics(MODEL)
            return results, stats

    results, stats = asyncio.run(run())
    for r, want in zip(results[:3], v1, strict=True):
        _assert_matches_v1(r.as_numpy("logits")[0], want)
    top1 = [_text(s[0]).split(":")[1] for s in results[3].as_numpy("logits")]
    assert top1 == [str(w[0]["index"]) for w in v1]
    assert stats["model_stats"][0]["inference_count"] > 0


def test_draining_answers_503_and_is_not_ready(server_factory, model_cache, photos):
    srv = server_factory(model_cache, max_batch_size=4, max_delay_ms=5)
    try:
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        assert c.is_server_ready()
        srv.server._loop.call_soon_threadsafe(srv.state.begin_drain)
        deadline = time.monotonic() + 10
        while c.is_server_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not c.is_server_ready() and not c.is_model_ready(MODEL)
        assert c.is_server_live()
        _raises("503", "shutting down", c.infer, MODEL, [_images(photos[:1])])
        c.close()
    finally:
        srv.stop()


def test_overload_is_429_with_retry_after_on_the_simulated_accelerator(model_cache, photos):
    from cvserve.config import BatchConfig, ModelConfig, ServerConfig

    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        preprocess_threads=2,
        models=(
            ModelConfig(
                MODEL,
                batching=BatchConfig(max_batch_size=1, max_delay_ms=1, max_queue=1),
                runtime="simulated",
                sim_profile="1:400",
            ),
        ),
    )
    with ServerThread(cfg) as srv:
        model = srv.state.models[MODEL]
        assert th.InferenceServerClient(srv.url.removeprefix("http://")).get_model_metadata(MODEL)[
            "outputs"
        ] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                body = json.dumps(
                    {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                 "data": ["x"]}]}
                ).encode()  # fmt: skip
                image = th.InferenceServerClient.generate_request_body([_images(photos[:1])])
                first = asyncio.create_task(
                    c.post(f"/v2/models/{MODEL}/infer", content=image[0],
                           headers={HEADER: str(image[1])})
                )  # fmt: skip
                while model.inflight == 0:
                    await asyncio.sleep(0.005)
                second = await c.post(f"/v2/models/{MODEL}/infer", content=body)
                return await first, second

        first, second = asyncio.run(run())
        assert first.status_code == 200, first.text
        assert "sim=1" in first.headers["server-timing"]
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
        assert "max_queue" in second.json()["error"]
        # more images than the model ever admits at once: a 400, not a retry
        c = th.InferenceServerClient(srv.url.removeprefix("http://"))
        _raises("400", "at most 1", c.infer, MODEL, [_images(photos[:2])])


def test_no_malformed_body_is_a_server_error(server):
    """The fuzzer's bodies over the wire: every one a 2xx/4xx with the v2 error shape."""
    from hypothesis import HealthCheck, given, settings

    from .test_parse import _near_valid_requests

    with httpx.Client(base_url=server.url, timeout=60) as c:

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_near_valid_requests())
        def check(case):
            body, header = case
            headers = {} if header is None else {HEADER: str(header)}
            r = c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
            assert r.status_code in (200, 400, 413, 415), (r.status_code, r.text)
            assert r.status_code == 200 or set(r.json()) == {"error"}
            assert "server-timing" in r.headers

        check()
        assert c.get("/v2/health/ready").status_code == 200


def test_header_lengths_are_ascii_digits(server):
    """Issue 20 #5: ``²`` is a digit to ``str.isdigit`` but not to ``int``: 400, not 500."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for value in ("²", "1²", "¹", "-1", "0x10", "1 2"):
            r = c.post(f"/v2/models/{MODEL}/infer", content=b"{}",
                       headers={HEADER: value.encode("latin-1")})  # fmt: skip
            assert r.status_code == 400 and HEADER in r.json()["error"], (value, r.text)
