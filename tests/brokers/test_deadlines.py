"""Deadlines cross the broker hop: a worker drops an item whose request deadline has
passed without running or answering it (the request had its 504), and a request that
times out or is cancelled withdraws its items no worker has taken."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cvserve.brokers import Message, ResultRouter, ResultTimeout, StageConsumer
from cvserve.brokers.message import DEADLINE

from .conftest import run


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, batch: list[Message]) -> list[Message]:
        self.seen += [m.request_id for m in batch]
        return [m.reply(headers={"ok": True}) for m in batch]


def test_an_expired_item_is_dropped_unrun_and_answers_nothing(make_broker):
    stage = Recorder()

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            worker = StageConsumer(b, "crops", "rec", stage, batch=8, block_ms=20)
            live = router.expect("live", 1)
            for rid, deadline in (("gone", time.time() - 1), ("live", time.time() + 60)):
                await b.publish("crops", Message(rid, headers={DEADLINE: deadline},
                                                 arrays={"x": np.zeros(2)},
                                                 reply_to=router.topic))  # fmt: skip
            serving = asyncio.create_task(worker.run())
            got = await asyncio.wait_for(live, 10)
            await asyncio.sleep(0.2)  # a result for "gone" would have come by now
            worker.stop()
            await serving
            return got, worker.stats, router.stats, await b.pending("crops", "rec")

    got, stats, rstats, pending = run(main())
    assert got[0].message.headers["ok"] is True
    assert stage.seen == ["live"]  # the expired item never reached the stage
    assert (stats.expired, stats.processed) == (1, 1)
    assert (rstats.late, rstats.unknown) == (0, 0)  # no second answer for "gone"
    assert pending == 0  # acknowledged: nobody takes it again


def test_an_item_without_a_deadline_or_with_a_future_one_runs(make_broker):
    assert not Message("r").expired(time.time())
    assert not Message("r", headers={DEADLINE: time.time() + 5}).expired(time.time())
    assert Message("r", headers={DEADLINE: time.time() - 5}).expired(time.time())


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_request_that_gives_up_withdraws_its_unstarted_items(make_broker, how):
    stage = Recorder()

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.create_group("crops", "rec")
            items = [Message("r1", index=i, arrays={"x": np.zeros(2)}) for i in range(5)]
            await router.publish("crops", items)
            assert await b.length("crops") == 5
            if how == "timeout":
                with pytest.raises(ResultTimeout):
                    await router.wait("r1", 5, timeout=0.05)
            else:
                waiter = asyncio.create_task(router.wait("r1", 5))
                await asyncio.sleep(0.05)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            for _ in range(100):  # the withdrawal runs in the background
                if router.stats.withdrawn == 5:
                    break
                await asyncio.sleep(0.02)
            worker = StageConsumer(b, "crops", "rec", stage, batch=8, block_ms=20)
            ran = await worker.run_once()
            return router.stats.withdrawn, ran, await b.length("crops")

    withdrawn, ran, left = run(main())
    assert (withdrawn, ran, left) == (5, 0, 0)
    assert stage.seen == []


def test_an_item_already_taken_is_not_withdrawn(make_broker, kind):
    async def main():
        async with make_broker() as b:
            await b.create_group("crops", "rec")
            ids = [await b.publish("crops", Message("r", index=i)) for i in range(2)]
            taken = await b.consume("crops", "rec", "w1", count=1)
            gone = await b.withdraw("crops", ids)
            return taken, gone, await b.pending("crops", "rec")

    taken, gone, pending = run(main())
    assert len(taken) == 1 and pending == 1
    # Redis deletes the taken entry's data too (its worker has the message and acks it;
    # a reclaim skips it); in-process keeps what a worker holds
    assert gone == (1 if kind == "inprocess" else 2)
