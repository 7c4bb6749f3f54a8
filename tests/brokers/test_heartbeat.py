"""A live worker's slow batch is not taken over (it touches its items while they run);
a batch that runs past ``hang_ms`` counts as hung and is; ``touch`` leaves another
consumer's items alone."""

from __future__ import annotations

import asyncio

import numpy as np

from cvserve.brokers import Message, ResultRouter, StageConsumer

from .conftest import run

IDLE_MS = 300


def _items(request_id: str, n: int) -> list[Message]:
    return [Message(request_id, i, arrays={"x": np.array([float(i)])}) for i in range(n)]


def _slow(seconds: float, calls: list[str], started: asyncio.Event | None = None):
    async def handler(batch: list[Message]) -> list[Message]:
        calls.append(",".join(str(m.index) for m in batch))
        if started is not None:
            started.set()
        await asyncio.sleep(seconds)
        return [m.reply(arrays={"y": m.arrays["x"] + 1}) for m in batch]

    return handler


def _worker(b, name: str, handler, **kw) -> StageConsumer:
    return StageConsumer(b, "crops", "rec", handler, consumer=name, block_ms=20,
                       reclaim_idle_ms=IDLE_MS, **kw)  # fmt: skip


def test_a_slow_batch_of_a_live_worker_is_not_taken_over(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.create_group("crops", "rec")
            fut = await router.publish("crops", _items("slow", 3))
            slow_calls, other_calls = [], []
            took = asyncio.Event()
            slow = _worker(b, "slow", _slow(5 * IDLE_MS / 1000, slow_calls, took))
            tasks = [asyncio.create_task(slow.run())]
            await asyncio.wait_for(took.wait(), 20)  # it takes the batch first
            other = _worker(b, "other", _slow(0.0, other_calls))
            tasks.append(asyncio.create_task(other.run()))
            got = await asyncio.wait_for(fut, 20)
            for w in (slow, other):
                w.stop()
            await asyncio.gather(*tasks)
            return got, slow_calls, other_calls, slow.stats, other.stats

    got, slow_calls, other_calls, s, o = run(main())
    assert [float(d.message.arrays["y"][0]) for d in got] == [1.0, 2.0, 3.0]
    assert slow_calls == ["0,1,2"] and other_calls == []  # ran once, by its worker
    assert s.processed == 3 and o.reclaimed == 0


def test_a_batch_past_hang_ms_is_taken_over(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.create_group("crops", "rec")
            fut = await router.publish("crops", _items("hung", 1))
            hung_calls, other_calls = [], []
            took = asyncio.Event()
            hung = _worker(b, "hung", _slow(30.0, hung_calls, took), hang_ms=2 * IDLE_MS)
            tasks = [asyncio.create_task(hung.run())]
            await asyncio.wait_for(took.wait(), 20)  # it takes the batch first
            other = _worker(b, "other", _slow(0.0, other_calls))
            tasks.append(asyncio.create_task(other.run()))
            got = await asyncio.wait_for(fut, 20)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return got, hung_calls, other_calls, other.stats

    got, hung_calls, other_calls, o = run(main())
    assert [float(d.message.arrays["y"][0]) for d in got] == [1.0]
    assert hung_calls == ["0"] and other_calls == ["0"] and o.reclaimed == 1


def test_touch_restarts_only_the_owners_clock(make_broker):
    async def main():
        async with make_broker() as b:
            await b.create_group("crops", "rec")
            for m in _items("t", 2):
                await b.publish("crops", m)
            mine = await b.consume("crops", "rec", "me", count=2)
            ids = [d.id for d in mine]
            await asyncio.sleep(2 * IDLE_MS / 1000)
            touched_by_other = await b.touch("crops", "rec", "someone-else", ids)
            touched = await b.touch("crops", "rec", "me", ids[:1])
            taken = await b.reclaim("crops", "rec", "thief", min_idle_ms=IDLE_MS)
            nothing = await b.touch("crops", "rec", "me", [])
            return ids, touched_by_other, touched, [d.id for d in taken], taken, nothing

    ids, by_other, touched, taken_ids, taken, nothing = run(main())
    assert (by_other, touched, nothing) == (0, 1, 0)
    assert taken_ids == ids[1:]  # the untouched one went; the touched one stayed
    assert taken[0].deliveries == 2  # touching never counted as a delivery
