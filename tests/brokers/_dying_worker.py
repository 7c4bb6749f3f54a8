"""A stage worker that takes a batch and never acknowledges it: the test SIGKILLs it.

    python _dying_worker.py URL TOPIC GROUP CONSUMER COUNT

Prints ``took <n> <entry ids>`` once it holds a batch, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys

from cvserve.brokers import broker_from_url


async def main(url: str, topic: str, group: str, consumer: str, count: int) -> None:
    broker = broker_from_url(url)
    taken = []
    while len(taken) < count:
        taken += await broker.consume(
            topic, group, consumer, count=count - len(taken), block_ms=1000
        )
    print("took", len(taken), *(d.id for d in taken), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    url, topic, group, consumer, count = sys.argv[1:6]
    asyncio.run(main(url, topic, group, consumer, int(count)))
