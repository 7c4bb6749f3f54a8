"""An item that keeps killing its workers goes to the dead letters, once; its request is
answered at once with an error that says where; its batch-mates are served; and
``cvserve broker dead-letters`` lists it.

Against Redis the workers are separate processes that SIGKILL themselves on the poison
item. The in-process broker lives in one process, so there a "death" is a consumer that
takes the item and never acknowledges it (what a dead worker leaves behind).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cvserve.brokers import Message, ResultRouter, StageConsumer, broker_from_url, dead_topic
from cvserve.brokers.consumer import DEAD_LETTER, ERROR
from cvserve.cli import main as cli_main

from .conftest import run

SUICIDAL_WORKER = Path(__file__).with_name("_suicidal_worker.py")
POISON = -1.0  # an item whose x holds this kills the worker that runs it


async def _plus_one(batch: list[Message]) -> list[Message]:
    return [m.reply(arrays={"y": m.arrays["x"] + 1}) for m in batch]


def _items(rid: str, xs: list[float]) -> list[Message]:
    return [Message(rid, index=i, arrays={"x": np.array([x])}) for i, x in enumerate(xs)]


async def _die_in_process(b, idle_ms: int) -> None:
    """One death: take what a worker would (a reclaimed item alone, else a batch) and
    never acknowledge it."""
    await asyncio.sleep(1.5 * idle_ms / 1000)
    taken = await b.reclaim("crops", "rec", "doomed", min_idle_ms=idle_ms, count=1)
    if not taken:
        taken = await b.consume("crops", "rec", "doomed", count=10)
    assert taken


async def _die_in_subprocess(url: str, idle_ms: int, max_deliveries: int) -> int:
    """A real StageConsumer process that SIGKILLs itself on the poison item."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SUICIDAL_WORKER), url, "crops", "rec", str(idle_ms),
        str(max_deliveries), str(POISON),
    )  # fmt: skip
    return await asyncio.wait_for(proc.wait(), 30)


def test_an_item_that_kills_every_worker_is_dead_lettered_and_its_request_answered(
    kind, broker_url, make_broker
):
    idle_ms, max_deliveries = 150, 2
    xs = [POISON, 1.0, 2.0]

    async def main():
        async with make_broker() as b, ResultRouter(b) as router:
            await b.create_group("crops", "rec")
            fut = await router.publish("crops", _items("req-poison", xs))
            deaths = []
            for _ in range(max_deliveries):  # each delivery kills the worker that ran it
                if kind == "redis":
                    deaths.append(await _die_in_subprocess(broker_url, idle_ms, max_deliveries))
                else:
                    await _die_in_process(b, idle_ms)
            survivor = StageConsumer(
                b, "crops", "rec", _plus_one, consumer="survivor", block_ms=20,
                reclaim_idle_ms=idle_ms, max_deliveries=max_deliveries,
            )  # fmt: skip
            serving = asyncio.create_task(survivor.run())
            got = await asyncio.wait_for(fut, 20)
            survivor.stop()
            await serving
            letters = await b.dead_letters("crops")
            everywhere = await b.dead_letters()
            left = await b.length("crops"), await b.pending("crops", "rec")
            return deaths, got, survivor.stats, letters, everywhere, left

    deaths, got, wstats, letters, everywhere, left = run(main(), timeout=90)
    if kind == "redis":
        assert deaths == [-9] * max_deliveries  # really killed by SIGKILL, each time
    poison, *mates = got
    # The poison item: an error saying what happened and where it was kept.
    assert "was delivered 3 times" in poison.message.headers[ERROR]
    assert f"max_deliveries={max_deliveries}" in poison.message.headers[ERROR]
    [letter] = letters
    assert poison.message.headers[DEAD_LETTER] == f"{dead_topic('crops')} {letter.id}"
    # Its batch-mates died with it once, then ran alone and were answered.
    assert [float(d.message.arrays["y"][0]) for d in mates] == [2.0, 3.0]
    assert all(ERROR not in d.message.headers for d in mates)
    assert wstats.dead_lettered == 1 and wstats.processed == len(mates)
    # Kept for inspection: the whole message, and why.
    assert (letter.topic, letter.group, letter.request_id) == ("crops", "rec", "req-poison")
    assert letter.deliveries == max_deliveries + 1
    assert letter.consumer == "survivor" and "died, hung or lost the broker" in letter.reason
    assert letter.message.index == 0 and float(letter.message.arrays["x"][0]) == POISON
    assert abs(letter.dead_at - time.time()) < 120
    assert everywhere == letters
    assert left == (0, 0)  # nothing left to reclaim: it stops coming back


def test_an_item_finished_meanwhile_is_not_dead_lettered(make_broker):
    async def main():
        async with make_broker() as b:
            await b.publish("crops", Message("r", arrays={"x": np.zeros(1)}))
            [d] = await b.consume("crops", "rec", "slow", count=1)
            await b.ack("crops", "rec", [d.id])  # the slow worker finished after all
            moved = await b.dead_letter(d, "rec", reason="late")
            return moved, await b.dead_letters("crops")

    assert run(main()) == (None, [])


def test_dead_letters_command_lists_them(redis_server, capsys):
    url = f"{redis_server.url}?prefix=dlcli:"

    async def main():
        async with broker_from_url(url) as b:
            for topic in ("ocr.rec", "dc.classify"):
                await b.delete_topic(dead_topic(topic))
                await b.publish(topic, Message(f"req-{topic}", index=2))
                [d] = await b.consume(topic, "g", "c")
                await b.dead_letter(d, "g", reason="why not", consumer="c")

    run(main())
    assert cli_main(["broker", "dead-letters", "--broker", url, "--pipeline", "dc"]) == 0
    out, err = capsys.readouterr()
    [line] = out.splitlines()
    assert "dc.classify" in line and "request req-dc.classify item 2" in line
    assert "deliveries 1" in line and "why not" in line
    assert "1 dead letters (pipeline dc)" in err
    assert cli_main(["broker", "dead-letters", "--broker", url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["topic"] for r in rows) == ["dc.classify", "ocr.rec"]
    assert {r["request_id"] for r in rows} == {"req-dc.classify", "req-ocr.rec"}


def test_dead_letters_command_refuses_an_in_process_broker(capsys):
    assert cli_main(["broker", "dead-letters", "--broker", "inprocess://"]) == 2
    assert "in-process broker" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0, -1])
def test_max_deliveries_must_be_positive(bad):
    with pytest.raises(ValueError):
        StageConsumer(None, "t", "g", _plus_one, max_deliveries=bad)  # type: ignore[arg-type]
