"""A worker dies holding work; another reclaims it; every request is answered once.

Against Redis the dying worker is a separate process, SIGKILLed before it acknowledges.
The in-process broker lives in one process, so there the worker is a task, cancelled.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import numpy as np

from cvserve.brokers import Message, ResultRouter, StageConsumer

from .conftest import run

DYING_WORKER = Path(__file__).with_name("_dying_worker.py")


async def _double(batch: list[Message]) -> list[Message]:
    return [m.reply(arrays={"y": m.arrays["x"] * 2}) for m in batch]


async def _die_in_process(broker, topic: str, group: str, count: int) -> list[str]:
    took: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()

    async def dying() -> None:
        taken = await broker.consume(topic, group, "doomed", count=count)
        took.set_result([d.id for d in taken])
        await asyncio.Event().wait()  # holds the batch until killed

    task = asyncio.create_task(dying())
    ids = await took
    task.cancel()
    return ids


async def _die_in_subprocess(url: str, topic: str, group: str, count: int) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(DYING_WORKER), url, topic, group, "doomed", str(count),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert line[:2] == ["took", str(count)], line
    assert proc.returncode == -signal.SIGKILL
    return line[2:]


def test_work_of_a_killed_worker_is_reclaimed_and_every_request_answered_once(
    kind, broker_url, make_broker
):
    n_requests, crops, held = 6, 3, 5

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.create_group("crops", "rec")
            futures = {}
            for r in range(n_requests):
                rid = f"req-{r}"
                futures[rid] = router.expect(rid, crops)
                for i in range(crops):
                    x = np.full((4, 4), 10 * r + i, np.float32)
                    await b.publish(
                        "crops", Message(rid, index=i, arrays={"x": x}, reply_to=router.topic)
                    )
            if kind == "redis":
                dead_ids = await _die_in_subprocess(broker_url, "crops", "rec", held)
            else:
                dead_ids = await _die_in_process(b, "crops", "rec", held)
            pending_after_death = await b.pending("crops", "rec")

            survivor = StageConsumer(
                b, "crops", "rec", _double, consumer="survivor", batch=4, block_ms=50,
                reclaim_idle_ms=200,
            )  # fmt: skip
            serving = asyncio.create_task(survivor.run())
            results = {}
            for rid, fut in futures.items():
                results[rid] = await asyncio.wait_for(fut, 20)
            # Let the survivor reclaim and serve anything still due, then stop it.
            survivor.stop()
            await serving
            return (
                dead_ids,
                pending_after_death,
                results,
                survivor.stats,
                router.stats,
                await b.length("crops"),
                await b.pending("crops", "rec"),
            )

    dead_ids, pending_after_death, results, wstats, rstats, left, pending = run(main())
    assert len(dead_ids) == held and pending_after_death == held
    assert wstats.reclaimed == held  # exactly the dead worker's batch came back
    assert wstats.processed == n_requests * crops  # each crop served once
    for r in range(n_requests):
        got = results[f"req-{r}"]
        assert [d.message.index for d in got] == list(range(crops))
        assert [float(d.message.arrays["y"][0, 0]) for d in got] == [
            2.0 * (10 * r + i) for i in range(crops)
        ]
    assert rstats.routed == n_requests * crops and rstats.duplicates == 0
    assert left == 0 and pending == 0
