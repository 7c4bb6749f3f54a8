"""A serving process's result router with a reply-stream expiry: the test SIGKILLs it.

    python _reply_router.py URL TTL_S

Prints ``topic <reply topic>`` once started, then refreshes the expiry until killed.
"""

from __future__ import annotations

import asyncio
import sys

from cvserve.brokers import ResultRouter, broker_from_url


async def main(url: str, ttl_s: float) -> None:
    router = await ResultRouter(broker_from_url(url), ttl_s=ttl_s).start()
    print("topic", router.topic, flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
