"""Results routed back by request id, once each; stage workers answering every item."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cvserve.brokers import BrokerError, Message, ResultRouter, ResultTimeout, StageConsumer
from cvserve.brokers.consumer import BROKER_S, ERROR

from .conftest import run


async def _double(batch: list[Message]) -> list[Message]:
    return [m.reply(arrays={"y": m.arrays["x"] * 2}, headers={"n": len(batch)}) for m in batch]


def test_fanned_out_requests_get_their_own_results_in_order(make_broker):
    sizes = [1, 3, 2, 4, 1, 5, 2, 3]

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            worker = StageConsumer(b, "crops", "rec", _double, consumer="w1", batch=4, block_ms=50)
            serving = asyncio.create_task(worker.run())

            async def request(k: int, n: int) -> list:
                rid = f"req-{k}"
                fut = router.expect(rid, n)  # before publishing: no result can be missed
                for i in range(n):
                    crop = np.full((2, 2), 100 * k + i, np.int32)
                    await b.publish(
                        "crops", Message(rid, index=i, arrays={"x": crop}, reply_to=router.topic)
                    )
                return await asyncio.wait_for(fut, 10)

            results = await asyncio.gather(*(request(k, n) for k, n in enumerate(sizes)))
            worker.stop()
            await serving
            return results, router.stats, worker.stats

    results, stats, wstats = run(main())
    for k, (n, deliveries) in enumerate(zip(sizes, results, strict=True)):
        assert [d.message.request_id for d in deliveries] == [f"req-{k}"] * n
        assert [d.message.index for d in deliveries] == list(range(n))
        assert [int(d.message.arrays["y"][0, 0]) for d in deliveries] == [
            2 * (100 * k + i) for i in range(n)
        ]
        assert all(d.message.headers[BROKER_S] >= 0 and d.broker_s >= 0 for d in deliveries)
    assert stats.routed == sum(sizes) and stats.duplicates == stats.unknown == stats.late == 0
    assert wstats.processed == sum(sizes) and wstats.failed == 0


def test_duplicate_results_are_ignored(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            fut = router.expect("r", 2)
            first = Message("r", index=0, headers={"copy": 1})
            await b.publish(router.topic, first)
            await b.publish(router.topic, Message("r", index=0, headers={"copy": 2}))
            await b.publish(router.topic, Message("r", index=1))
            got = await asyncio.wait_for(fut, 10)
            await b.publish(router.topic, Message("r", index=1))  # after the answer
            while router.stats.duplicates < 2:
                await asyncio.sleep(0.01)
            return got, router.stats, await b.length(router.topic)

    got, stats, left = run(main())
    assert [d.message.index for d in got] == [0, 1]
    assert got[0].message.headers == {"copy": 1}  # the first result wins
    assert stats.duplicates == 2 and stats.routed == 2
    assert left == 0  # every reply entry was acknowledged


def test_results_that_arrive_before_wait_are_not_missed(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            router.expect("quick", 2)
            for i in range(2):
                await b.publish(router.topic, Message("quick", index=i))
            while router.stats.routed < 2:  # answered before anyone waits
                await asyncio.sleep(0.01)
            got = await router.wait("quick", 2, timeout=10)
            return [d.message.index for d in got], len(router._unclaimed)

    assert run(main()) == ([0, 1], 0)


def test_a_request_without_results_times_out_cleanly(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.publish(router.topic, Message("slow", index=0))
            with pytest.raises(ResultTimeout) as timeout:
                await router.wait("slow", 2, timeout=0.2)
            waiting = router.waiting
            await b.publish(router.topic, Message("slow", index=1))  # too late
            while router.stats.late < 1:
                await asyncio.sleep(0.01)
            # The router keeps serving other requests.
            fut = router.expect("next")
            await b.publish(router.topic, Message("next"))
            [d] = await asyncio.wait_for(fut, 10)
            return timeout.value, waiting, d.message.request_id, router.stats

    err, waiting, next_id, stats = run(main())
    assert (err.request_id, err.received, err.expected) == ("slow", 1, 2)
    assert isinstance(err, TimeoutError)
    assert waiting == 0 and next_id == "next"
    assert stats.late == 1 and stats.routed == 2


def test_results_nobody_asked_for_are_counted_not_delivered(make_broker):
    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            fut = router.expect("r", 1)
            await b.publish(router.topic, Message("stranger"))
            await b.publish(router.topic, Message("r", index=5))  # out of range
            await b.publish(router.topic, Message("r", index=0))
            [d] = await asyncio.wait_for(fut, 10)
            return d.message.index, router.stats

    index, stats = run(main())
    assert index == 0 and stats.unknown == 2


def test_closing_the_router_fails_waiters_and_drops_its_topic(make_broker):
    async def main():
        async with make_broker() as b:
            router = await ResultRouter(b).start()
            fut = router.expect("r")
            await b.publish(router.topic, Message("other"))
            await router.close()
            with pytest.raises(BrokerError, match="closed"):
                await fut
            return await b.length(router.topic)

    assert run(main()) == 0


def test_a_failing_stage_answers_every_item_with_an_error(make_broker):
    calls = []

    async def flaky(batch: list[Message]) -> list[Message]:
        calls.append(len(batch))
        if any(m.headers.get("bad") for m in batch):
            raise RuntimeError("cannot read crop")
        return [m.reply(headers={"ok": True}) for m in batch]

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            worker = StageConsumer(b, "crops", "rec", flaky, batch=2, block_ms=50)
            bad = router.expect("bad", 2)
            for i in range(2):
                await b.publish(
                    "crops", Message("bad", index=i, headers={"bad": True}, reply_to=router.topic)
                )
            good = router.expect("good", 1)
            await b.publish("crops", Message("good", reply_to=router.topic))
            serving = asyncio.create_task(worker.run())
            bad_r, good_r = await asyncio.wait_for(asyncio.gather(bad, good), 10)
            worker.stop()
            await serving
            return bad_r, good_r, worker.stats, await b.length("crops")

    bad_r, good_r, stats, left = run(main())
    assert [d.message.headers[ERROR] for d in bad_r] == ["RuntimeError: cannot read crop"] * 2
    assert good_r[0].message.headers["ok"] is True and ERROR not in good_r[0].message.headers
    assert stats.failed == 2 and stats.processed == 3
    assert left == 0
