"""Pipelines across processes through Redis Streams: external workers share a stage, a
killed worker's items are reclaimed, and a Redis outage gives fast 503s, then recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from cvserve.config import PipelineConfig, ServerConfig
from cvserve.serving.server import ServerThread, free_port

PREDICT = "/v1/pipelines/dc:predict"
PARAMS = {"detector": "tiny-yolos", "classifier": "tiny-resnet", "objects": 6}


def _worker(url: str, cache, reclaim_ms: int = 1500) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cvserve", "worker", "--pipeline", "dc", "--kind", "detect-classify",
         "--stage", "classify", "--broker", url, "--cache-dir", str(cache), "--max-batch", "4",
         "--reclaim-idle-ms", str(reclaim_ms),
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


def _server(url: str, cache, workers: int = 0, timeout_ms: float = 30_000) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        broker=url,
        pipelines=(
            PipelineConfig(
                "dc",
                kind="detect-classify",
                workers=workers,
                block_ms=5,
                timeout_ms=timeout_ms,
                params=PARAMS,
            ),  # fmt: skip
        ),
    )
    return ServerThread(cfg).start()


async def _burst(url: str, bodies: list[bytes], timeout: float = 60) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        return await asyncio.gather(
            *(client.post(PREDICT, content=b) for b in bodies), return_exceptions=True
        )


@pytest.fixture
def photos(data_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_dir / "images" / "small").glob("*.jpg"))]


@pytest.fixture
def built(model_cache):
    from cvserve.models import store

    store.ensure_built("tiny-yolos", model_cache)
    return model_cache


def test_two_external_workers_share_the_stage_and_a_killed_one_loses_nothing(
    redis_server, built, photos
):
    url = f"{redis_server.url}?prefix=p{os.getpid()}a:"
    a, b = _worker(url, built), _worker(url, built)
    try:
        _wait_line(a, "worker:")
        _wait_line(b, "worker:")
        srv = _server(url, built, workers=0)
        try:
            first = asyncio.run(_burst(srv.url, photos * 2))
            assert all(r.status_code == 200 for r in first), first
            assert all(len(r.json()["objects"]) == 6 for r in first)

            # Kill one worker while a burst is in flight: its pending items are reclaimed
            # by the other after --reclaim-idle-ms, and every request is answered once.
            async def kill_during():
                task = asyncio.create_task(_burst(srv.url, photos * 3))
                await asyncio.sleep(0.3)
                a.send_signal(signal.SIGKILL)
                return await task

            second = asyncio.run(kill_during())
            assert [getattr(r, "status_code", r) for r in second] == [200] * len(second)
            assert all(len(r.json()["objects"]) == 6 for r in second)
        finally:
            srv.stop()
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)


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
        assert waited < 15  # answered, not hung until the 20 s deadline
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
