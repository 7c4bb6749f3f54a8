"""Pipelines across processes through Redis Streams: external workers share a stage, a
killed worker's items are reclaimed, and a Redis outage gives fast 503s, then recovery.
An item that outlives its deliveries is dead-lettered and its request answered at once; a
Redis that restarts empty while a request waits gets its items again (200), one that stays
away fails it with 503, both long before its deadline; AUTH in the broker URL."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from served import stop_processes

from cvserve.brokers.redis_server import RedisServer
from cvserve.config import PipelineConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port

PREDICT = "/v1/pipelines/dc:predict"
PARAMS = {"detector": "tiny-yolos", "classifier": "tiny-resnet", "objects": 6}
TOPIC, GROUP = "dc.classify", "classify"  # stage B's work topic and consumer group
DYING_WORKER = Path(__file__).parents[1] / "brokers" / "_dying_worker.py"


def _worker(url: str, cache, reclaim_ms: int = 1500, max_deliveries: int = 3) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cvserve", "worker", "--pipeline", "dc", "--kind", "detect-classify",
         "--stage", "classify", "--broker", url, "--cache-dir", str(cache), "--max-batch-size", "4",
         "--reclaim-idle-ms", str(reclaim_ms), "--max-deliveries", str(max_deliveries),
         *[a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _wait_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return
        assert line or proc.poll() is None, "worker exited"
    raise TimeoutError(f"no {prefix!r} from the worker")


def _server(
    url: str, cache, workers: int = 0, timeout_ms: float = 30_000, progress=None, **pipeline
) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        broker=url,
        pipelines=(
            PipelineConfig(
                "dc",
                kind="detect-classify",
                stage_workers=workers,
                block_ms=5,
                timeout_ms=timeout_ms,
                params=PARAMS,
                **pipeline,
            ),  # fmt: skip
        ),
    )
    return ServerThread(cfg, progress).start()


async def _burst(url: str, bodies: list[bytes], timeout: float = 60) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        return await asyncio.gather(
            *(client.post(PREDICT, content=b) for b in bodies), return_exceptions=True
        )


def _objects(r: httpx.Response) -> list[dict]:
    return r.json()["objects"]


@pytest.fixture
def photos(data_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_dir / "images" / "small").glob("*.jpg"))]


@pytest.fixture
def built(model_cache):
    from cvserve.models import store

    store.ensure_built("tiny-yolos", model_cache)
    return model_cache


async def _pending_of(r, key: str, consumer: bytes) -> list[bytes]:
    """Entry ids that ``consumer`` holds: delivered to it and not yet acknowledged."""
    rows = await r.xpending_range(key, GROUP, "-", "+", 10_000, consumername=consumer)
    return [row["message_id"] for row in rows]


async def _catch_holding(r, key: str, proc: subprocess.Popen, body: Callable[[], Awaitable]):
    """Run ``body`` (a burst) and, once worker ``proc`` holds pending items, stop it
    (SIGSTOP: it can no longer acknowledge anything) and SIGKILL it. Returns the
    consumer name, the ids it held when stopped and once dead, and the burst's result. A burst that ends before the worker held anything is run again."""
    mine = f"{socket.gethostname()}-{proc.pid}-".encode()
    for _ in range(3):
        task = asyncio.create_task(body())
        deadline = time.monotonic() + 60
        while not task.done() and time.monotonic() < deadline:
            summary = await r.xpending(key, GROUP)
            name = next(
                (c["name"] for c in summary["consumers"]
                 if c["name"].startswith(mine) and c["pending"] > 0),
                None,
            )  # fmt: skip
            if name is not None:
                proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.05)  # an ack already on the wire lands first
                held = await _pending_of(r, key, name)
                if held:
                    proc.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(proc.wait, 10)
                    held_dead = await _pending_of(r, key, name)
                    return name, held, held_dead, await task
                proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.002)
        await task
    raise AssertionError("the worker never held an item during three bursts")


def test_two_external_workers_share_the_stage_and_a_killed_one_loses_nothing(
    redis_server, built, photos
):
    prefix = f"p{os.getpid()}a:"
    url = f"{redis_server.url}?prefix={prefix}"
    key = prefix + TOPIC
    a, b = _worker(url, built), _worker(url, built)
    try:
        _wait_line(a, "worker:")
        _wait_line(b, "worker:")
        srv = _server(url, built, workers=0)
        try:
            first = asyncio.run(_burst(srv.url, photos * 2))
            assert all(r.status_code == 200 for r in first), first
            want = {i: _objects(r) for i, r in enumerate(first[: len(photos)])}
            assert all(len(objs) == 6 for objs in want.values())
            router = srv.state.pipelines["dc"].router
            before = dataclasses.replace(router.stats)
            bodies = photos * 3

            async def kill_during():
                r = aioredis.Redis.from_url(redis_server.url)
                try:
                    caught = await _catch_holding(r, key, a, lambda: _burst(srv.url, bodies))
                    # Items the dead worker finished (their requests are answered) but never
                    # acknowledged are taken over once idle for reclaim_idle_ms, counted
                    # from its last heartbeat (Broker.touch): wait for that.
                    for _ in range(150):
                        if (await r.xpending(key, GROUP))["pending"] == 0:
                            break
                        await asyncio.sleep(0.1)
                    consumers = {c["name"]: c for c in await r.xinfo_consumers(key, GROUP)}
                    return (*caught, consumers, await r.xpending(key, GROUP), await r.xlen(key))
                finally:
                    await r.aclose()

            dead, held, held_dead, second, consumers, pending, left = asyncio.run(kill_during())
        finally:
            srv.stop()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    assert a.returncode == -signal.SIGKILL
    # The dead worker held work it never acknowledged (and a blocked read may have handed
    # it more before Redis noticed it was gone).
    held = set(held) | set(held_dead)
    assert held
    # Afterwards nothing is left: every item the dead worker held was acknowledged. The
    # group has no other member than the two workers, so the survivor reclaimed them.
    survivor = f"{socket.gethostname()}-{b.pid}-".encode()
    assert len(consumers) == 2 and dead in consumers
    assert all(n == dead or n.startswith(survivor) for n in consumers)
    assert consumers[dead]["pending"] == 0
    assert pending["pending"] == 0 and left == 0
    # Every request answered once, with its own objects (the same as without the kill).
    assert [getattr(r, "status_code", r) for r in second] == [200] * len(bodies)
    for i, r in enumerate(second):
        got, ref = _objects(r), want[i % len(photos)]
        assert [o["box"] for o in got] == [o["box"] for o in ref]
        assert [o["label"] for o in got] == [o["label"] for o in ref]
        assert [o["score"] for o in got] == pytest.approx([o["score"] for o in ref], abs=1e-4)
    stats = router.stats
    assert stats.routed - before.routed == 6 * len(bodies)  # each item answered once
    # a second result comes only from reclaimed work that the dead worker had finished
    assert stats.duplicates - before.duplicates <= len(held)
    assert stats.late == before.late and stats.unknown == before.unknown


def test_redis_outage_gives_fast_503s_and_the_server_recovers_by_itself(
    redis_factory, built, photos
):
    redis = redis_factory()
    url = redis.url
    srv = _server(url, built, workers=1, timeout_ms=20_000)
    try:
        ok = asyncio.run(_burst(srv.url, photos[:4]))
        assert [r.status_code for r in ok] == [200] * 4
        redis.stop()
        t0 = time.monotonic()
        down = asyncio.run(_burst(srv.url, photos[:4], timeout=30))
        waited = time.monotonic() - t0
        codes = [getattr(r, "status_code", repr(r)) for r in down]
        assert set(codes) == {503}, codes
        assert down[0].json()["error"]["kind"] == "broker_unavailable"
        assert waited < 20  # answered, not hung until the 20 s deadline (a 504)
        redis.start()  # same port
        deadline = time.monotonic() + 30
        while True:
            again = asyncio.run(_burst(srv.url, photos[:2]))
            if all(getattr(r, "status_code", None) == 200 for r in again):
                break
            assert time.monotonic() < deadline, [getattr(r, "status_code", r) for r in again]
            time.sleep(0.5)
    finally:
        srv.stop()
        redis.stop()


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.02)


def _while_waiting(
    srv: ServerThread, redis: RedisServer, key: str, body: bytes, during: Callable
) -> tuple:
    """Send one request; once its 6 items are in Redis (``key``), run ``during()`` (in a
    thread: it may block); returns the response, the seconds from the items being queued
    to the answer, and what ``during`` returned."""

    async def main():
        r = aioredis.Redis.from_url(redis.url)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            task = asyncio.create_task(client.post(PREDICT, content=body))

            async def queued() -> bool:
                return await r.xlen(key) >= 6

            await _until(queued, "the request's 6 items in Redis")
            await r.aclose()
            t0 = time.monotonic()
            got = await asyncio.to_thread(during)
            resp = await task
            return resp, time.monotonic() - t0, got

    return asyncio.run(main())


def test_a_request_waiting_when_redis_restarts_empty_is_answered(redis_factory, built, photos):
    redis = redis_factory()
    url = f"{redis.url}?prefix=restart:"
    # No worker yet: the request's items wait in Redis when it dies with them.
    srv = _server(url, built, workers=0, timeout_ms=30_000, broker_outage_ms=20_000)
    worker = None
    try:

        def restart_then_serve():
            nonlocal worker
            redis.stop()  # SIGKILL, no persistence: the items are gone
            redis.start()  # same port, empty
            worker = _worker(url, built)  # only the items published again can be served

        resp, waited, _ = _while_waiting(
            srv, redis, "restart:" + TOPIC, photos[0], restart_then_serve
        )
        stats = srv.state.pipelines["dc"].router.stats
    finally:
        srv.stop()
        if worker is not None:
            stop_processes(worker)
    assert resp.status_code == 200, resp.text  # not a 504 after 30 s
    assert len(_objects(resp)) == 6
    assert stats.republished == 6 and stats.abandoned == 0
    assert waited < 30


def test_a_request_waiting_when_redis_goes_away_gets_503_not_its_deadline(
    redis_factory, built, photos
):
    redis = redis_factory()
    url = f"{redis.url}?prefix=away:"
    srv = _server(url, built, workers=0, timeout_ms=30_000, broker_outage_ms=1_000)
    try:
        resp, waited, _ = _while_waiting(srv, redis, "away:" + TOPIC, photos[0], redis.stop)
        stats = srv.state.pipelines["dc"].router.stats
    finally:
        redis.start()  # lets the server drop its reply stream on the way out
        srv.stop()
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["kind"] == "broker_unavailable" and "limit 1 s" in error["message"]
    assert stats.abandoned == 1
    assert waited < 30  # answered, not held until the 30 s deadline (a 504)


def test_an_item_that_outlives_its_deliveries_is_dead_lettered_and_answered(
    redis_factory, built, photos
):
    redis = redis_factory()
    url = f"{redis.url}?prefix=dead:"
    key = "dead:" + TOPIC
    srv = _server(url, built, workers=0, timeout_ms=30_000)
    procs: list[subprocess.Popen] = []
    try:
        # A worker takes all 6 items and dies holding them (SIGKILL) ...
        doomed = subprocess.Popen(
            [sys.executable, str(DYING_WORKER), url, TOPIC, GROUP, "doomed", "6"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(doomed)

        def kill_then_serve():
            line = doomed.stdout.readline().split()
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(10)
            # ... and a worker that allows one delivery reclaims them: dead letters.
            procs.append(_worker(url, built, reclaim_ms=300, max_deliveries=1))
            return line

        resp, waited, took = _while_waiting(srv, redis, key, photos[0], kill_then_serve)

        async def inspect():
            r = aioredis.Redis.from_url(redis.url)
            try:
                return await r.xlen(key), await r.xpending(key, GROUP)
            finally:
                await r.aclose()

        left, pending = asyncio.run(inspect())
        listed = subprocess.run(
            [sys.executable, "-m", "cvserve", "broker", "dead-letters", "--broker", url,
             "--pipeline", "dc"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        srv.stop()
        stop_processes(*procs)
    assert took[:2] == ["took", "6"]
    assert resp.status_code == 500, resp.text
    error = resp.json()["error"]
    assert error["kind"] == "stage_failed"
    assert "was delivered 2 times" in error["message"] and "max_deliveries=1" in error["message"]
    assert error["dead_letter"].startswith(f"{TOPIC}.dead ")
    assert waited < 30
    assert left == 0 and pending["pending"] == 0  # nothing keeps coming back
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert len(rows) == 6 and all(f"{TOPIC}  " in r and "deliveries 2" in r for r in rows)
    assert {r.split(" item ")[1].split()[0] for r in rows} == {str(i) for i in range(6)}
    assert "6 dead letters (pipeline dc)" in listed.stderr


PASSWORD = "pipe:l1ne@pass"


def test_auth_in_the_broker_url_and_never_a_password_shown(
    redis_exe, tmp_path, built, photos, caplog
):
    redis = RedisServer(redis_exe, tmp_path / "locked", password=PASSWORD).start()
    wrong = f"redis://:wrong-{PASSWORD.replace('@', '%40')}@127.0.0.1:{redis.port}/0"
    try:
        # A wrong password: start-up fails (no hang, no retry loop), saying so, naming no
        # password.
        with pytest.raises(RuntimeError) as failed:
            _server(wrong, built, workers=1)
        worker = _worker(wrong, built)
        out, _ = worker.communicate(timeout=120)
        # The right one: served, and shown redacted everywhere.
        said: list[str] = []
        srv = _server(redis.url, built, workers=1, progress=said.append)
        try:
            ok = asyncio.run(_burst(srv.url, photos[:1]))
            listing = httpx.get(f"{srv.url}/v1/pipelines", timeout=30)
        finally:
            srv.stop()
    finally:
        redis.stop()
    assert "refused the credentials" in f"{failed.value} {caplog.text}"
    assert worker.returncode == 2 and "refused the credentials" in out
    assert ok[0].status_code == 200, ok[0].text
    [shown] = listing.json()["pipelines"]
    assert shown["broker"] == f"redis://:***@127.0.0.1:{redis.port}/0"
    assert shown["max_deliveries"] == 3
    texts = [str(failed.value), caplog.text, out, listing.text, *said]
    for secret in (PASSWORD, "pipe:l1ne%40pass", "wrong-"):
        assert not any(secret in t for t in texts), secret
    assert any("redis://:***@" in line for line in said)
