"""A stage worker that SIGKILLs itself when it runs the poison item, as a worker whose
model segfaults on one input does; it serves everything else.

    python _suicidal_worker.py URL TOPIC GROUP RECLAIM_IDLE_MS MAX_DELIVERIES POISON

Exits (killed) on the first poison item it runs; the test starts the next one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from cvserve.brokers import Message, StageConsumer, broker_from_url


async def main(url: str, topic: str, group: str, idle_ms: int, max_deliveries: int, poison: float):
    async def handler(batch: list[Message]) -> list[Message]:
        if any(float(m.arrays["x"][0]) == poison for m in batch):
            os.kill(os.getpid(), signal.SIGKILL)
        return [m.reply(arrays={"y": m.arrays["x"] + 1}) for m in batch]

    broker = broker_from_url(url)
    worker = StageConsumer(
        broker, topic, group, handler, block_ms=20, reclaim_idle_ms=idle_ms,
        max_deliveries=max_deliveries,
    )  # fmt: skip
    await asyncio.wait_for(worker.run(), 20)


if __name__ == "__main__":
    url, topic, group, idle_ms, max_deliveries, poison = sys.argv[1:7]
    asyncio.run(main(url, topic, group, int(idle_ms), int(max_deliveries), float(poison)))
