"""cvserve.client against real servers: every kind of image, the timings, the typed
errors with the server's own message, and the asyncio twin."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

import cvserve.client as client_pkg
from cvserve.client import (
    AsyncClient,
    BadRequest,
    Client,
    GatewayTimeout,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthorized,
    Unreachable,
    UnsupportedMediaType,
)
from cvserve.config import BatchConfig, ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port

MODEL = "tiny-resnet"


def _start(cache, *, model: ModelConfig | None = None, **server) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        preprocess_threads=2,
        max_body_bytes=2 * 1024 * 1024,
        models=(model or ModelConfig(MODEL, batching=BatchConfig(max_batch_size=4)),),
        **server,
    )
    return ServerThread(cfg).start()


@pytest.fixture(scope="module")
def server(model_cache):
    srv = _start(model_cache)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photo(data_dir):
    return data_dir / "images" / "small" / "dog.jpg"


def test_public_names_are_pinned():
    assert sorted(client_pkg.__all__) == sorted(
        ["Answer", "AsyncClient", "BadRequest", "Client", "CvserveError", "GatewayTimeout",
         "MethodNotAllowed", "NotFound", "Overloaded", "PayloadTooLarge", "ServerError",
         "ServiceUnavailable", "Unauthorized", "Unreachable", "UnsupportedMediaType"]
    )  # fmt: skip


def test_a_path_bytes_a_pil_image_and_an_array_give_the_same_answer(server, photo):
    im = Image.open(photo).convert("RGB")
    with Client(server.url) as c:
        assert c.ready()
        by_path = c.predict(MODEL, photo, params={"top_k": 3})
        by_str = c.predict(MODEL, str(photo), params={"top_k": 3})
        by_bytes = c.predict(MODEL, photo.read_bytes(), params={"top_k": 3})
        by_pil = c.predict(MODEL, im, params={"top_k": 3})
        by_array = c.predict(MODEL, np.asarray(im), params={"top_k": 3})
    for a in (by_path, by_str, by_bytes, by_pil, by_array):
        assert a.status == 200 and a.result["model"] == MODEL and len(a["top_k"]) == 3
        assert a.result["image_size"] == [im.width, im.height]
        assert a.request_id and len(a.request_id) == 16
        assert {"recv", "decode", "infer"} <= set(a.timings)
        assert all(v >= 0 for v in a.timings.values())
        assert a.server_ms == pytest.approx(sum(a.timings.values()))
    top = [t["index"] for t in by_path["top_k"]]
    assert [t["index"] for t in by_bytes["top_k"]] == top
    # PNG of the decoded pixels (lossless) against the JPEG itself: the same picture
    assert [t["index"] for t in by_pil["top_k"]] == [t["index"] for t in by_array["top_k"]]


def test_several_images_one_answer_each_in_order(server, data_dir):
    photos = sorted((data_dir / "images" / "small").glob("*.jpg"))[:3]
    with Client(server.url) as c:
        one = [c.predict(MODEL, p).result for p in photos]
        many = c.predict_many(MODEL, photos)
        assert c.models()[0]["name"] == MODEL and c.model(MODEL)["name"] == MODEL
        assert c.pipelines() == []
    results = many.result["results"]
    assert [r["image_size"] for r in results] == [r["image_size"] for r in one]
    assert [r["top_k"][0]["index"] for r in results] == [r["top_k"][0]["index"] for r in one]
    assert "infer" in many.timings


def test_each_refusal_is_its_typed_error_with_the_servers_message(server, photo):
    with Client(server.url) as c:
        with pytest.raises(NotFound, match="no model named 'nope'") as e:
            c.predict("nope", photo)
        assert e.value.status == 404 and e.value.detail["models"] == [MODEL]
        with pytest.raises(BadRequest) as e:
            c.predict(MODEL, b"\xff\xd8\xff\xe0 not really a jpeg")
        assert e.value.kind == "undecodable_image" and e.value.request_id
        with pytest.raises(BadRequest, match="top_k"):
            c.predict(MODEL, photo, params={"top_k": 0})
        with pytest.raises(UnsupportedMediaType, match="unknown"):
            c.predict(MODEL, b"\x00\x00\x00\x18ftypisom" + bytes(64))
        with pytest.raises(PayloadTooLarge) as e:
            c.predict(MODEL, bytes(3 * 1024 * 1024))
        assert e.value.status == 413 and e.value.detail["max_body_bytes"] == 2 * 1024 * 1024
        with pytest.raises(GatewayTimeout) as e:
            c.predict(MODEL, photo, deadline_ms=0.001)
        assert e.value.kind == "deadline_exceeded"
        with pytest.raises(TypeError, match="cannot send a dict"):
            c.predict(MODEL, {"not": "an image"})
        with pytest.raises(TypeError, match="uint8"):
            c.predict(MODEL, np.zeros((4, 4, 3), np.float32))
        # a wrong method, as the server says it
        r = c._http.get(f"/v1/models/{MODEL}:predict")
        with pytest.raises(MethodNotAllowed):
            from cvserve.client._wire import answer_from

            answer_from(r.status_code, r.headers, r.content)
        assert c.predict(MODEL, photo).status == 200  # nothing lost


def test_keys_read_as_the_server_reads_them(model_cache, tmp_path, photo):
    keys = tmp_path / "keys"
    keys.write_text("# the team's key\n\n  s3cret-key  \n")
    keys.chmod(0o600)
    srv = _start(model_cache, api_key_file=str(keys))
    try:
        with Client(srv.url) as c, pytest.raises(Unauthorized) as e:
            c.predict(MODEL, photo)
        assert e.value.status == 401
        with Client(srv.url, api_key="wrong") as c, pytest.raises(Unauthorized) as e:
            c.predict(MODEL, photo)
        assert e.value.status == 403 and e.value.kind == "forbidden"
        with Client(srv.url, api_key_file=str(keys)) as c:
            assert c.predict(MODEL, photo).status == 200
    finally:
        srv.stop()


def test_overload_is_429_with_retry_after_and_the_async_client_agrees(model_cache, photo):
    slow = ModelConfig(
        MODEL,
        batching=BatchConfig(max_batch_size=1, max_delay_ms=0, max_queue=1),
        runtime="simulated",
        sim_profile="1:400",
    )
    srv = _start(model_cache, model=slow)

    async def burst() -> list:
        async with AsyncClient(srv.url) as c:
            assert await c.ready()
            assert (await c.models())[0]["name"] == MODEL
            return await asyncio.gather(
                *(c.predict(MODEL, photo) for _ in range(6)), return_exceptions=True
            )

    try:
        outs = asyncio.run(burst())
    finally:
        srv.stop()
    refused = [o for o in outs if isinstance(o, Overloaded)]
    served = [o for o in outs if not isinstance(o, Exception)]
    assert refused and served and len(refused) + len(served) == 6, outs
    assert all(o.status == 429 and o.retry_after >= 1 and o.kind == "overloaded" for o in refused)
    assert all(o.simulated and "infer" in o.timings for o in served)


def test_no_server_is_unreachable():
    with Client(f"http://127.0.0.1:{free_port()}", timeout_s=5) as c:
        assert not c.ready()
        with pytest.raises(Unreachable) as e:
            c.predict(MODEL, b"x")
    assert e.value.status is None and "127.0.0.1" in str(e.value)


def test_npz_and_png_answers_come_back_as_arrays_and_bytes():
    from cvserve.client._wire import answer_from
    from cvserve.tasks.encode import encode_array, encode_result

    mask = np.arange(12, dtype=np.uint8).reshape(3, 4)
    result = {"model": "seg", "mask": mask, "classes": [{"id": 1, "area": np.int64(5)}]}
    body, ctype = encode_result(result, "application/x-npz")  # as the server encodes it
    a = answer_from(200, {"content-type": ctype, "server-timing": "infer;dur=2.5"}, body)
    np.testing.assert_array_equal(a["mask"], mask)
    assert a["classes"] == [{"id": 1, "area": 5}] and a.timings == {"infer": 2.5}
    body, ctype = encode_result({"mask": encode_array(mask)}, None)
    a = answer_from(200, {"content-type": ctype}, body)
    np.testing.assert_array_equal(a.array("mask"), mask)
    png = answer_from(200, {"content-type": "image/png"}, b"\x89PNG...")
    assert png.result == b"\x89PNG..." and png.content_type == "image/png"
