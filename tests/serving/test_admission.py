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
        fresh = httpx.get(f"{srv.url}/metrics", timeout=10).text
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
    # before any request: gauges read 0, never NaN (dashboards and alerts choke on it)
    assert "NaN" not in fresh
    assert f'cvserve_service_rate{{model="{MODEL}"}} 0.0' in fresh
    assert f'cvserve_expected_wait_seconds{{model="{MODEL}"}} 0.0' in fresh
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


def test_a_closed_loop_deeper_than_the_automatic_limit_is_queued(model_cache, photo):
    """8 clients, each sending again once answered, at a model that serves 10 a second:
    each waits ~0.8 s, 4x the automatic limit (2 rounds of 1 at 10/s: 200 ms), yet they
    are a standing queue, not overload: no 429."""
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        preprocess_threads=2,
        models=(
            ModelConfig(
                MODEL,
                batching=BatchConfig(max_batch_size=1, max_delay_ms=0),
                runtime="simulated",
                sim_profile="1:100",
            ),
        ),  # fmt: skip
    )
    srv = ServerThread(cfg).start()

    def client() -> list[int]:
        return [_post(srv.url, photo).status_code for _ in range(6)]

    try:
        with ThreadPoolExecutor(8) as ex:
            statuses = [s for f in [ex.submit(client) for _ in range(8)] for s in f.result()]
        described = _admission(srv.url)
    finally:
        srv.stop()
    assert statuses == [200] * 48
    assert described["service_rate_per_s"] is not None  # the limit was known, and held off
    assert described["wait_limit_ms"] is not None and not described["queue_growing"]


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


# --- telling overload from concurrency: simulated time, Admission's own clock -----------
class _Sim:
    """A servable in simulated time: one instance runs batches of up to ``max_batch``
    requests, each batch ``base + per_row x rows`` seconds, first come first served;
    clients arrive and leave through a real :class:`Admission` whose clock is this one."""

    def __init__(self, adm_kw: dict | None = None, *, max_batch: int = 8, base: float = 0.002,
                 per_row: float = 0.013, max_queue: int = 64) -> None:  # fmt: skip
        import heapq

        from cvserve.serving.core import CPU_WAIT_ROUNDS, Admission

        self.heapq = heapq
        self.now = 0.0
        self.adm = Admission("model sim", max_queue, 1, clock=lambda: self.now,
                             **{"max_wait_s": None, "round_rows": max_batch,
                                "rounds": CPU_WAIT_ROUNDS, **(adm_kw or {})})  # fmt: skip
        self.max_batch, self.base, self.per_row = max_batch, base, per_row
        self.events: list = []
        self.seq = 0
        self.queue: list = []  # admitted requests waiting: (arrival time, cm, on_done)
        self.busy = False
        self.refused = 0
        self.sojourns: list[tuple[float, float]] = []  # (arrival, time to answer)
        self.max_inflight_after: dict[float, int] = {}

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        self.heapq.heappush(self.events, (t, self.seq, fn))

    def arrive(self, on_done: Callable[[], None], on_refused: Callable[[float], None]) -> None:
        from cvserve.serving.errors import Overloaded

        cm = self.adm.admit(deadline=self.now + 30.0)
        try:
            cm.__enter__()
        except Overloaded as e:
            self.refused += 1
            on_refused(e.retry_after_s)
            return
        self.queue.append((self.now, cm, on_done))
        self._start()

    def _start(self) -> None:
        if self.busy or not self.queue:
            return
        batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
        self.busy = True
        seconds = self.base + self.per_row * len(batch)
        start = self.now

        def end() -> None:
            self.adm.observe_batch(len(batch), seconds, end=self.now)
            for t0, cm, on_done in batch:
                cm.__exit__(None, None, None)
                self.sojourns.append((t0, self.now - t0))
                on_done()
            self.busy = False
            self._start()

        self.at(start + seconds, end)

    def run(self, until: float) -> None:
        while self.events and self.events[0][0] <= until:
            self.now, _, fn = self.heapq.heappop(self.events)
            fn()
        self.now = until

    @property
    def capacity(self) -> float:
        return self.max_batch / (self.base + self.per_row * self.max_batch)

    def closed_loop(self, clients: int, *, start: float = 0.0, until: float = 1e9,
                    rtt: float = 0.001, honour_retry_after: bool = False) -> None:  # fmt: skip
        """``clients`` that each send again ``rtt`` after an answer, refused or not."""

        def client() -> None:
            if self.now >= until:
                return

            def again(delay: float = rtt) -> None:
                self.at(self.now + delay, client)

            def refused(retry_after: float) -> None:
                again(retry_after if honour_retry_after else rtt)

            self.arrive(again, refused)

        for i in range(clients):
            self.at(start + i * 1e-4, client)

    def open_loop(self, rate: float, start: float, until: float, seed: int = 0) -> None:
        """Poisson arrivals at ``rate`` per second that never come back."""
        rng = np.random.default_rng(seed)
        t = start + rng.exponential(1 / rate)
        while t < until:
            self.at(t, lambda: self.arrive(lambda: None, lambda _ra: None))
            t += rng.exponential(1 / rate)


@pytest.mark.parametrize("clients", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("honour", [False, True])
def test_a_closed_loop_is_queued_not_refused(clients, honour):
    sim = _Sim()
    sim.closed_loop(clients, honour_retry_after=honour)
    sim.run(30.0)
    done = len(sim.sojourns)
    assert sim.refused == 0 and not sim.adm.growth.growing
    # one client leaves the servable idle between requests: no busy time, no rate
    assert (sim.adm.rate.per_s is None) == (clients == 1)
    # deep loops keep the server busy with full batches: as many answers as it can give
    # (shallower ones ride in smaller batches: this batcher waits for no one)
    if clients >= 2 * sim.max_batch:
        assert done >= 0.97 * sim.capacity * 30.0
    # each waited its turn: about clients / rate, within its 30 s deadline
    late = [s for t0, s in sim.sojourns if t0 > 5.0]
    rate = sim.adm.rate.per_s or sim.capacity
    assert max(late) <= clients / rate + 2 * (sim.base + sim.per_row * sim.max_batch)


def test_a_closed_loop_deeper_than_max_queue_is_refused_by_the_count():
    sim = _Sim(max_queue=16)
    sim.closed_loop(24, honour_retry_after=True)
    sim.run(10.0)
    assert sim.refused > 0  # 8 clients more than the queue holds


def test_overload_is_refused_by_expected_wait_and_admitted_again_when_it_ends():
    sim = _Sim()
    cap = sim.capacity  # ~75/s
    sim.open_loop(3 * cap, start=0.0, until=30.0)  # Poisson arrivals at 3x capacity
    sim.run(2.0)
    assert sim.adm.growth.growing  # detected within 2 s
    refused_at_2 = sim.refused
    sim.run(30.0)
    assert sim.adm.growth.growing
    assert sim.refused - refused_at_2 > 1.5 * cap * 28  # ~2/3 of the arrivals refused
    # once detected, what is admitted waits about the automatic limit, not the queue of
    # the count limit (64 requests, ~0.85 s): after 3 s every accepted request's time
    # stays under 2x the limit, and the server kept full: goodput held
    limit = sim.adm.wait_limit_s()
    during = [s for t0, s in sim.sojourns if 3.0 < t0 < 30.0]
    assert len(during) >= 0.95 * cap * 27
    assert max(during) < 2 * limit
    # the overload ends: a closed loop that starts then is queued, not refused
    refused_at_30 = sim.refused
    sim.closed_loop(32, start=31.0)
    sim.run(50.0)
    assert sim.refused == refused_at_30 and not sim.adm.growth.growing
    assert max(s for t0, s in sim.sojourns if t0 > 31.0) > 2 * limit  # a standing queue


@pytest.mark.parametrize("clients", [16, 64])
def test_overload_on_top_of_a_closed_loop_is_told_from_the_closed_loop(clients):
    sim = _Sim()
    cap = sim.capacity
    # a closed loop whose clients honour Retry-After runs throughout; Poisson arrivals at
    # 3x capacity come on top from 10 s to 30 s
    sim.closed_loop(clients, honour_retry_after=True)
    sim.run(10.0)
    assert sim.refused == 0
    sim.open_loop(3 * cap, start=10.0, until=30.0)
    sim.run(12.0)
    assert sim.adm.growth.growing
    sim.run(30.0)
    during = [s for t0, s in sim.sojourns if 13.0 < t0 < 30.0]
    assert len(during) >= 0.95 * cap * 17 and max(during) < 2 * sim.adm.wait_limit_s()
    # the refused clients come back after their Retry-After, which was long enough that
    # their returns do not look like a growing queue: they get in
    sim.run(45.0)
    assert not sim.adm.growth.growing
    refused_at_45 = sim.refused
    sim.run(60.0)
    assert sim.refused == refused_at_45


def test_retry_after_spreads_the_refused_while_the_queue_grows():
    sim = _Sim()
    seen: list[float] = []
    sim.open_loop(3 * sim.capacity, start=0.0, until=10.0)
    sim.arrive = _recording(sim.arrive, seen)
    sim.run(10.0)
    # ~2 x rate refusals a second must come back slower than GROWTH_SLACK x rate
    assert seen and sorted(seen)[len(seen) // 2] >= 2 / 0.25 - 1


def _recording(arrive, seen):
    def wrapped(on_done, on_refused):
        return arrive(on_done, lambda ra: (seen.append(ra), on_refused(ra)))

    return wrapped


def test_a_burst_of_clients_is_not_overload_but_a_burst_that_keeps_coming_is():
    from cvserve.serving.core import QueueGrowth

    g = QueueGrowth(burst=72)
    for _ in range(64):  # 64 clients arrive at once
        g.arrived(idle=False)
    assert not g.growing
    for _ in range(1000):  # then each sends again once answered
        g.left()
        g.arrived(idle=False)
    assert not g.growing and g.excess <= 1
    for _ in range(100):  # three arrivals for every answer
        g.left()
        for _ in range(3):
            g.arrived(idle=False)
    assert g.growing and g.excess == 72
    for _ in range(200):  # arrivals equal answers again: the growth drains
        g.left()
        g.arrived(idle=False)
    assert not g.growing
    g.excess, g.growing = 72, True
    g.arrived(idle=True)  # an arrival at an idle servable: nothing is growing
    assert not g.growing and g.excess == 1
