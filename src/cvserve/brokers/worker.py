"""A stage worker: consume a batch, run the stage, publish each result, *then* acknowledge.

Several workers (tasks, processes or hosts) on one topic and group share its load. A
worker also reclaims entries that another consumer left pending for ``reclaim_idle_ms``
(it died before acknowledging), so no work is lost; that work may then have been done
twice, and the results are deduplicated where they are joined (``ResultRouter``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .base import Broker
from .errors import BrokerError
from .message import Delivery, Message

log = logging.getLogger(__name__)

#: Result header: the work message's publish-to-consume time (the ``broker`` stage).
BROKER_S = "broker_s"
#: Result header set when the stage failed for this item; the text says why.
ERROR = "error"

BatchHandler = Callable[[list[Message]], Awaitable[list[Message]]]


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerStats:
    processed: int = 0
    reclaimed: int = 0
    failed: int = 0  # items answered with an error header


class StageWorker:
    """Serves one stage from ``topic`` as a member of ``group``.

    ``handler`` gets a batch of work messages and returns one result per message, in
    order (build them with ``Message.reply``). If it raises, or returns the wrong
    number of results, every message of the batch is answered with an ``error`` header,
    so a broken batch still answers its requests exactly once.
    """

    def __init__(
        self,
        broker: Broker,
        topic: str,
        group: str,
        handler: BatchHandler,
        *,
        consumer: str | None = None,
        batch: int = 16,
        block_ms: int = 200,
        reclaim_idle_ms: int = 30_000,
        retry_s: float = 0.2,
    ) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.handler = handler
        self.consumer = consumer or consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms
        self.retry_s = retry_s
        self.stats = WorkerStats()
        self._stop = asyncio.Event()
        self._next_reclaim = 0.0

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``stop``; a failing broker call is retried after ``retry_s``."""
        grouped = False
        while not self._stop.is_set():
            try:
                if not grouped:  # before any work is published, where the worker is first
                    await self.broker.create_group(self.topic, self.group)
                    grouped = True
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except BrokerError as e:
                log.warning("worker %s on %r: %s; retrying", self.consumer, self.topic, e)
                await asyncio.sleep(self.retry_s)

    async def run_once(self) -> int:
        """Reclaim (when due) or consume one batch, serve it; returns how many items."""
        deliveries: list[Delivery] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self.reclaim_idle_ms / 2000
            deliveries = await self.broker.reclaim(
                self.topic,
                self.group,
                self.consumer,
                min_idle_ms=self.reclaim_idle_ms,
                count=self.batch,
            )
            self.stats.reclaimed += len(deliveries)
        if not deliveries:
            deliveries = await self.broker.consume(
                self.topic, self.group, self.consumer, count=self.batch, block_ms=self.block_ms
            )
        if deliveries:
            await self.serve(deliveries)
        return len(deliveries)

    async def serve(self, deliveries: list[Delivery]) -> None:
        """Run the handler on ``deliveries``, publish the results, then acknowledge."""
        messages = [d.message for d in deliveries]
        try:
            results = await self.handler(messages)
            if len(results) != len(messages):
                raise RuntimeError(f"handler returned {len(results)} results for {len(messages)}")
        except Exception as e:
            log.exception("stage %r failed on a batch of %d", self.topic, len(messages))
            results = [m.reply(headers={ERROR: f"{type(e).__name__}: {e}"}) for m in messages]
            self.stats.failed += len(messages)
        for d, result in zip(deliveries, results, strict=True):
            # The result answers this item, whatever the handler put in its fields.
            result.request_id, result.index = d.message.request_id, d.message.index
            result.headers.setdefault(BROKER_S, d.broker_s)
            if d.message.reply_to:
                await self.broker.publish(d.message.reply_to, result)
        # Acknowledge only now that every result is stored: a crash before this point
        # leaves the work pending, to be reclaimed and redone.
        await self.broker.ack(self.topic, self.group, [d.id for d in deliveries])
        self.stats.processed += len(deliveries)
