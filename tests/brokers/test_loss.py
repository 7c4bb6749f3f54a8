"""What the broker loses, the server does not: a Redis that restarts empty gets the
unanswered items again; one that stays away fails the waiting requests promptly; a dead
server's reply stream expires. Against a real redis-server, SIGKILLed and restarted on
its port without persistence; the in-process broker cannot lose anything by itself.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cvserve.brokers import (
    BrokerUnavailable,
    InProcessBroker,
    Message,
    ResultRouter,
    StageConsumer,
    broker_from_url,
)

from .conftest import run

aioredis = pytest.importorskip("redis.asyncio")
REPLY_ROUTER = Path(__file__).with_name("_reply_router.py")


async def _plus_one(batch: list[Message]) -> list[Message]:
    return [m.reply(arrays={"y": m.arrays["x"] + 1}) for m in batch]


def _items(rid: str, xs: list[float]) -> list[Message]:
    return [Message(rid, index=i, arrays={"x": np.array([x])}) for i, x in enumerate(xs)]


def test_a_broker_restarted_empty_gets_the_unanswered_items_again(redis_factory):
    server = redis_factory()

    async def main():
        async with broker_from_url(server.url) as b:
            router = await ResultRouter(b, check_s=0.05, retry_s=0.05).start()
            a = await router.publish("crops", _items("a", [1.0, 2.0, 3.0]))
            half = await router.publish("crops", _items("half", [10.0, 20.0]))
            # One item of "half" was answered before the crash: it is not sent again.
            await b.publish(router.topic, Message("half", index=0, headers={"early": True}))
            while router.stats.routed < 1:
                await asyncio.sleep(0.01)
            queued = await b.length("crops")

            server.stop()  # SIGKILL: without persistence every item dies with it
            server.start()  # same port, empty
            while router.stats.republished == 0:
                await asyncio.sleep(0.02)
            # Only now a worker comes: what it serves can only be the copies sent again.
            worker = StageConsumer(b, "crops", "rec", _plus_one, block_ms=20, retry_s=0.05)
            serving = asyncio.create_task(worker.run())
            got_a = await asyncio.wait_for(a, 20)
            got_half = await asyncio.wait_for(half, 20)
            worker.stop()
            await serving
            await router.close()
            return queued, got_a, got_half, router.stats, worker.stats

    queued, got_a, got_half, rstats, wstats = run(main(), timeout=60)
    assert queued == 5
    assert [float(d.message.arrays["y"][0]) for d in got_a] == [2.0, 3.0, 4.0]
    assert got_half[0].message.headers == {"early": True}
    assert float(got_half[1].message.arrays["y"][0]) == 21.0
    assert rstats.republished == 4 and wstats.processed == 4  # 3 of a, 1 of half
    assert rstats.abandoned == 0


def test_waiting_requests_fail_promptly_while_the_broker_stays_away(redis_factory):
    server = redis_factory()

    async def main():
        async with broker_from_url(server.url) as b:
            router = await ResultRouter(b, check_s=0.05, outage_s=0.5).start()
            await router.publish("crops", _items("r", [1.0, 2.0]))
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=r"unreachable for .*limit 0.5 s") as err:
                await router.wait("r", 2, timeout=30)
            waited = time.monotonic() - t0
            server.start()
            await router.close()
            return waited, router.stats, str(err.value)

    waited, stats, message = run(main(), timeout=60)
    # the outage limit (0.5 s) ended the wait, not the request's 30 s timeout (which
    # raises TimeoutError): the error and its message say which limit
    assert waited < 30
    assert stats.abandoned == 1 and stats.republished == 0
    assert f"127.0.0.1:{server.port}" in message


def test_the_reply_stream_of_a_dead_server_expires(redis_server):
    prefix = "ttl:"
    url = f"{redis_server.url}?prefix={prefix}&reply_ttl=0.5"
    ttl_s = 1.0

    async def main():
        raw = aioredis.Redis.from_url(redis_server.url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(REPLY_ROUTER), url, str(ttl_s), stdout=asyncio.subprocess.PIPE
        )
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
            assert line[0] == "topic", line
            key = prefix + line[1]
            first_ttl = await raw.pttl(key)
            await asyncio.sleep(2.5 * ttl_s)  # outlives its ttl while it is refreshed
            alive = await raw.exists(key)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        t0 = time.monotonic()
        while await raw.exists(key):
            assert time.monotonic() - t0 < 10, "the dead server's reply stream never expired"
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - t0
        # A worker that still finishes its work makes the stream again, briefly.
        async with broker_from_url(url) as b:
            assert await b.publish_reply(line[1], Message("late")) is not None
        late_ttl = await raw.pttl(key)
        t0 = time.monotonic()
        while await raw.exists(key):
            assert time.monotonic() - t0 < 10, "a late reply made a stream that never expires"
            await asyncio.sleep(0.05)
        await raw.aclose()
        return first_ttl, alive, gone_after, late_ttl

    first_ttl, alive, gone_after, late_ttl = run(main(), timeout=60)
    assert 0 < first_ttl <= ttl_s * 1000
    assert alive == 1
    assert gone_after <= ttl_s + 5
    assert 0 < late_ttl <= 500


def test_in_process_replies_to_a_closed_router_are_dropped():
    async def main():
        async with InProcessBroker() as b:
            router = await ResultRouter(b).start()
            fut = await router.publish("crops", _items("r", [1.0]))
            worker = StageConsumer(b, "crops", "rec", _plus_one, block_ms=20)
            serving = asyncio.create_task(worker.run())
            [d] = await asyncio.wait_for(fut, 10)
            await router.close()  # its topic goes
            await b.publish(
                "crops", Message("after", arrays={"x": np.zeros(1)}, reply_to=router.topic)
            )
            while worker.stats.processed < 2:
                await asyncio.sleep(0.01)
            worker.stop()
            await serving
            return d, worker.stats, await b.length(router.topic), await b.epoch()

    d, stats, length, epoch = run(main())
    assert float(d.message.arrays["y"][0]) == 2.0
    assert stats.orphaned == 1 and length == 0
    assert epoch == "in-process"
