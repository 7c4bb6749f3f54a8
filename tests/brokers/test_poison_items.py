"""One malformed or poison item in a stage's stream fails only itself: its batch-mates,
from other requests, get their results (the batch is bisected, at bounded cost)."""

from __future__ import annotations

import asyncio

import numpy as np

from cvserve.brokers import Message, ResultRouter, StageConsumer
from cvserve.brokers.consumer import ERROR, FAILED_ALONE

from .conftest import run


class Doubler:
    """A stage that doubles each item's ``x``; a malformed item (no ``x``) makes the
    whole call raise, as a real stage's batched DNN call does. ``broken``: every call
    fails. Records the size of each call."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.calls: list[int] = []

    async def __call__(self, batch: list[Message]) -> list[Message]:
        self.calls.append(len(batch))
        if self.broken:
            raise RuntimeError("session is broken")
        x = np.stack([m.arrays["x"] for m in batch])  # KeyError on a malformed item
        return [m.reply(arrays={"y": row * 2}) for m, row in zip(batch, x, strict=True)]


async def _eight_requests(b, stage: Doubler, poison: set[int]):
    """Eight one-item requests published before the worker starts (one batch of 8);
    item k is malformed when k is in ``poison``. Returns each request's message."""
    async with ResultRouter(b) as router:
        worker = StageConsumer(b, "crops", "rec", stage, batch=8, block_ms=50)
        futs = []
        for k in range(8):
            futs.append(router.expect(f"r{k}", 1))
            arrays = {} if k in poison else {"x": np.full((2, 2), k, np.int32)}
            await b.publish("crops", Message(f"r{k}", arrays=arrays, reply_to=router.topic))
        serving = asyncio.create_task(worker.run())
        got = await asyncio.wait_for(asyncio.gather(*futs), 10)
        worker.stop()
        await serving
        return [d[0].message for d in got], worker.stats, await b.length("crops")


def test_a_malformed_item_fails_alone_and_its_seven_batch_mates_are_answered(make_broker):
    stage = Doubler()

    async def main():
        async with make_broker() as b:
            return await _eight_requests(b, stage, poison={5})

    results, stats, left = run(main())
    bad = results[5]
    assert bad.headers[ERROR] == "KeyError: 'x'" and bad.headers[FAILED_ALONE] is True
    for k, r in enumerate(results):
        if k != 5:
            assert ERROR not in r.headers
            np.testing.assert_array_equal(r.arrays["y"], np.full((2, 2), 2 * k))
    assert stage.calls[0] == 8 and len(stage.calls) == 1 + 6  # 3 levels, 2 halves each
    assert stats.failed == 1 and stats.reruns == 6 and stats.processed == 8
    assert left == 0


def test_a_stage_that_fails_everything_answers_the_batch_in_three_calls(make_broker):
    stage = Doubler(broken=True)

    async def main():
        async with make_broker() as b:
            return await _eight_requests(b, stage, poison=set())

    results, stats, left = run(main())
    assert all(r.headers[ERROR] == "RuntimeError: session is broken" for r in results)
    assert not any(FAILED_ALONE in r.headers for r in results)  # nobody to blame
    assert stage.calls == [8, 4, 4]
    assert stats.failed == 8 and stats.processed == 8 and left == 0
