"""Admission against a real server: by expected wait (a simulated model whose every
request takes 500 ms, so its service rate is 2/s and no CPU is burnt), by the request's
own deadline, the count limit before any rate is known, and the budget of decoded pixels
in flight. Behaviour only: which answer, with which body and headers; never how fast.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.cli import build_parser, server_config_from_args
from cvserve.config import (
    BatchConfig,
    ConfigError,
    ModelConfig,
    ServerConfig,
    server_config_from_dict,
)
from cvserve.images.budget import claim
from cvserve.serving.process import ServerThread, free_port
from cvserve.trace import Trace

MODEL = "tiny-resnet"
PREDICT = f"/v1/models/{MODEL}:predict"


@pytest.fixture(scope="module")
def photo(data_dir) -> bytes:
    return (data_dir / "images" / "small" / "dog.jpg").read_bytes()


def _slow_server(cache, **batching) -> ServerThread:
    """One instance, batches of one, 500 ms each on the simulated device: 2 requests/s."""
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        preprocess_threads=2,
        models=(
            ModelConfig(
                MODEL,
                batching=BatchConfig(max_batch_size=1, max_delay_ms=0, **batching),
                runtime="simulated",
                sim_profile="1:500",
            ),
        ),
    )
    return ServerThread(cfg).start()


def _post(url: str, data: bytes, **headers: str) -> httpx.Response:
    return httpx.post(url + PREDICT, content=data, timeout=60,
                      headers={"content-type": "image/jpeg", **headers})  # fmt: skip


def _admission(url: str) -> dict:
    return httpx.get(f"{url}/v1/models/{MODEL}", timeout=10).json()["admission"]


def _until(what: Callable[[], object], timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def _queue_then(url: str, photo: bytes, n: int, then: Callable[[], httpx.Response]):
    """Send ``n`` requests at once; once the server knows its service rate, ``then()``.
    Returns the ``n`` responses and what ``then`` got."""
    with ThreadPoolExecutor(n) as ex:
        first = [ex.submit(_post, url, photo) for _ in range(n)]
        _until(lambda: _admission(url)["service_rate_per_s"])
        late = then()
        return [f.result() for f in first], late


def test_expected_wait_past_max_queue_wait_is_refused_at_once(model_cache, photo):
    srv = _slow_server(model_cache, max_queue_wait_ms=700)
    try:
        before = _admission(srv.url)
        first, late = _queue_then(srv.url, photo, 8, lambda: _post(srv.url, photo))
        after = _post(srv.url, photo)  # the queue has drained
        described = _admission(srv.url)
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    finally:
        srv.stop()
    # the same estimate in /metrics: rate, expected wait (nothing ahead now) and the limit
    rate, wait, limit = (
        float(line.rsplit(" ", 1)[1]) for name in
        ("cvserve_service_rate", "cvserve_expected_wait_seconds", "cvserve_wait_limit_seconds")
        for line in metrics.splitlines() if line.startswith(f'{name}{{model="{MODEL}"}}')
    )  # fmt: skip
    assert rate == pytest.approx(2.0, rel=0.25) and limit == 0.7
    assert wait == pytest.approx(0.5, rel=0.25)  # an idle model: its own batch only
    # no rate before any request: only the count limit (64) applied, so all 8 got in
    assert before["service_rate_per_s"] is None and before["wait_limit_ms"] == 700
    assert [r.status_code for r in first] == [200] * 8
    # with the rate known (2/s), several requests ahead mean a wait past 700 ms: 429
    assert late.status_code == 429
    err = late.json()["error"]
    assert err["kind"] == "overloaded" and "max_queue_wait_ms=700" in err["message"]
    assert err["limit_ms"] == 700 and err["expected_wait_ms"] > 700 and err["queue"] >= 1
    expected = err["queue"] / err["service_rate_per_s"] + 0.5  # + one batch of 500 ms
    assert err["expected_wait_ms"] == pytest.approx(expected * 1000, rel=0.25)
    assert int(late.headers["Retry-After"]) >= 1
    assert after.status_code == 200
    assert described["service_rate_per_s"] == pytest.approx(2.0, rel=0.25)


def test_a_deadline_shorter_than_the_expected_wait_is_refused_at_once(model_cache, photo):
    srv = _slow_server(model_cache, max_queue_wait_ms=0)  # by time: only the deadline

    def both() -> tuple[httpx.Response, httpx.Response]:
        with ThreadPoolExecutor(2) as ex:
            short = ex.submit(_post, srv.url, photo, **{"x-timeout-ms": "1000"})
            default = ex.submit(_post, srv.url, photo)  # 30 s: waits its turn
            return short.result(), default.result()

    try:
        first, (short, default) = _queue_then(srv.url, photo, 8, both)
    finally:
        srv.stop()
    assert [r.status_code for r in first] == [200] * 8
    assert short.status_code == 429  # not a 504 a second later
    err = short.json()["error"]
    assert "deadline" in err["message"] and err["limit_ms"] <= 1000
    assert err["expected_wait_ms"] > err["limit_ms"]
    assert int(short.headers["Retry-After"]) >= 1
    assert default.status_code == 200


# --- decoded pixels in flight ----------------------------------------------------------
def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_an_image_that_does_not_fit_the_pixel_budget_gets_429(model_cache, photo):
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        preprocess_threads=2,
        max_pixels=1_000_000,
        max_pixels_in_flight=1_000_000,
        models=(ModelConfig(MODEL),),
    )
    srv = ServerThread(cfg).start()
    pool, budget = srv.state.pool, srv.state.pool.pixel_budget
    gate = threading.Event()

    def hold() -> None:  # a decode in progress that holds 900,000 pixels
        claim(900_000)
        gate.wait(30)

    try:
        held = asyncio.run_coroutine_threadsafe(
            pool.submit(Trace(), hold, deadline=time.perf_counter() + 60, stage="decode"),
            srv.server._loop,
        )
        _until(lambda: budget.in_flight == 900_000)
        png = _png(600, 400)  # 240,000 pixels decoded in full: does not fit
        refused = httpx.post(srv.url + PREDICT, content=png, timeout=30,
                             headers={"content-type": "image/png"})  # fmt: skip
        # an 800x534 JPEG decodes at reduced scale for this model: fits beside the hold
        jpeg = _post(srv.url, photo)
        gate.set()
        held.result(30)
        again = httpx.post(srv.url + PREDICT, content=png, timeout=30,
                           headers={"content-type": "image/png"})  # fmt: skip
        in_flight_after = budget.in_flight
    finally:
        gate.set()
        srv.stop()
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    err = refused.json()["error"]
    assert err["kind"] == "overloaded"
    assert err["pixels"] == 240_000 and err["max_pixels_in_flight"] == 1_000_000
    assert err["pixels_in_flight"] == 900_000
    assert jpeg.status_code == 200
    assert again.status_code == 200 and in_flight_after == 0
    assert budget.refused == 1 and budget.peak <= 1_000_000


# --- settings ------------------------------------------------------------------------
def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--model", "m", *argv])


def test_flags_and_config_keys():
    cfg = server_config_from_args(_serve_args())
    assert cfg.models[0].batching.max_queue_wait_ms is None  # auto
    assert cfg.max_pixels_in_flight == 0
    assert cfg.resolved_pixels_in_flight() >= cfg.max_pixels
    cfg = server_config_from_args(
        _serve_args("--max-queue-wait-ms", "250", "--max-pixels-in-flight", "100000000")
    )
    assert cfg.models[0].batching.max_queue_wait_ms == 250.0
    assert cfg.resolved_pixels_in_flight() == 100_000_000
    off = server_config_from_args(_serve_args("--max-queue-wait-ms", "0"))
    assert off.models[0].batching.max_queue_wait_ms == 0.0
    # a pipeline's wait is off unless asked for (its fan-out varies per image)
    both = server_config_from_args(_serve_args("--pipeline", "ocr"))
    assert both.models[0].batching.max_queue_wait_ms is None
    assert both.pipelines[0].max_queue_wait_ms == 0.0
    auto = server_config_from_args(_serve_args("--pipeline", "ocr", "--max-queue-wait-ms", "auto"))
    assert auto.pipelines[0].max_queue_wait_ms is None
    with pytest.raises(SystemExit):
        _serve_args("--max-queue-wait-ms", "-5")
    with pytest.raises(ConfigError, match="max_pixels_in_flight"):
        server_config_from_args(_serve_args("--max-pixels-in-flight", "1000"))
    models = [{"name": "a", "max_queue_wait_ms": "auto"}, {"name": "b", "max_queue_wait_ms": 400}]
    from_file = server_config_from_dict({"models": models})
    assert [m.batching.max_queue_wait_ms for m in from_file.models] == [None, 400.0]
    with pytest.raises(ConfigError, match="max_queue_wait_ms"):
        server_config_from_dict({"models": [{"name": "a", "max_queue_wait_ms": "soon"}]})
