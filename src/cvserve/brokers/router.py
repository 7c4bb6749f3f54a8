"""Results back to the request that waits for them: one reply topic per serving process.

The serving process registers a request (``expect``) *before* publishing its work, with
``reply_to=router.topic`` on every work message, then awaits ``wait`` (or the future that
``expect`` returned). The ``ResultRouter`` consumes the reply topic and resolves the
request once all ``count`` items (indices ``0..count-1``) have arrived, in index order;
results that arrive before ``wait`` is called are kept for it. Reclaimed work can produce a second result for an item:
results are deduplicated by ``(request_id, index)``, so every request is answered once.
A request whose results do not all arrive in time fails with ``ResultTimeout``; results
arriving later are acknowledged and counted as ``late``, never delivered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from .base import Broker
from .errors import BrokerError, ResultTimeout
from .message import Delivery

log = logging.getLogger(__name__)


@dataclass
class RouterStats:
    """Counts of results that did not answer anything, by reason."""

    routed: int = 0
    duplicates: int = 0  # a second result for an item (reclaimed work finished twice)
    late: int = 0  # the request had timed out or been forgotten
    unknown: int = 0  # no such request was expected, or an index out of range


@dataclass
class _Waiting:
    future: asyncio.Future[list[Delivery]]
    count: int
    results: dict[int, Delivery] = field(default_factory=dict)


class ResultRouter:
    """Owns the consume loop of a reply topic and a map of request id -> future."""

    def __init__(
        self,
        broker: Broker,
        topic: str | None = None,
        *,
        group: str = "router",
        batch: int = 256,
        block_ms: int = 200,
        retry_s: float = 0.2,
        remember: int = 65536,
        delete_on_close: bool = True,
    ) -> None:
        self.broker = broker
        self.topic = topic or f"replies.{uuid.uuid4().hex[:16]}"
        self.group = group
        self.consumer = self.topic
        self.batch = batch
        self.block_ms = block_ms
        self.retry_s = retry_s
        self.delete_on_close = delete_on_close
        self.stats = RouterStats()
        self._waiting: dict[str, _Waiting] = {}
        # Request ids recently answered or given up on: tells duplicates and late results
        # from results nobody asked for, in bounded memory.
        self._finished: OrderedDict[str, bool] = OrderedDict()  # id -> answered
        # Answered requests whose results ``wait`` has not collected yet (the results can
        # arrive between ``expect`` and ``wait``); ``wait`` pops them, so this stays small.
        self._unclaimed: OrderedDict[str, asyncio.Future[list[Delivery]]] = OrderedDict()
        self._remember = remember
        self._unacked: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ResultRouter:
        await self.broker.create_group(self.topic, self.group)
        self._task = asyncio.create_task(self._run(), name=f"result-router {self.topic}")
        return self

    async def __aenter__(self) -> ResultRouter:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def expect(self, request_id: str, count: int = 1) -> asyncio.Future[list[Delivery]]:
        """Register a request of ``count`` items; its future gets their results in order."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if request_id in self._waiting:
            raise ValueError(f"request {request_id!r} is already awaited")
        fut: asyncio.Future[list[Delivery]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = _Waiting(fut, count)
        return fut

    async def wait(
        self, request_id: str, count: int = 1, timeout: float | None = None
    ) -> list[Delivery]:
        """Await the results of a request (``expect`` it first unless already done)."""
        answered = self._unclaimed.pop(request_id, None)
        if answered is not None:
            return answered.result()
        waiting = self._waiting.get(request_id)
        if waiting is None:
            self.expect(request_id, count)
            waiting = self._waiting[request_id]
        fut = waiting.future
        try:
            async with asyncio.timeout(timeout):
                results = await asyncio.shield(fut)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                results = fut.result()  # answered in the same tick as the timeout
            else:
                self.forget(request_id)
                raise ResultTimeout(
                    request_id, len(waiting.results), waiting.count, timeout or 0.0
                ) from None
        except asyncio.CancelledError:
            self.forget(request_id)
            raise
        self._unclaimed.pop(request_id, None)
        return results

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request; its results, if they come, are counted as late."""
        self._unclaimed.pop(request_id, None)
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            if not waiting.future.done():
                waiting.future.cancel()
            self._finish(request_id, answered=False)

    @property
    def waiting(self) -> int:
        """How many requests await results."""
        return len(self._waiting)

    def _finish(self, request_id: str, *, answered: bool) -> None:
        self._finished[request_id] = answered
        if len(self._finished) > self._remember:
            self._finished.popitem(last=False)

    def _route(self, delivery: Delivery) -> None:
        msg = delivery.message
        waiting = self._waiting.get(msg.request_id)
        if waiting is None:
            answered = self._finished.get(msg.request_id)
            if answered is None:
                self.stats.unknown += 1
                log.warning("result for unknown request %r dropped", msg.request_id)
            elif answered:
                self.stats.duplicates += 1
            else:
                self.stats.late += 1
                log.info("late result for request %r (timed out) dropped", msg.request_id)
            return
        if not 0 <= msg.index < waiting.count:
            self.stats.unknown += 1
            log.warning(
                "result index %d out of range for request %r of %d items",
                msg.index,
                msg.request_id,
                waiting.count,
            )
            return
        if msg.index in waiting.results:
            self.stats.duplicates += 1
            return
        waiting.results[msg.index] = delivery
        self.stats.routed += 1
        if len(waiting.results) == waiting.count:
            del self._waiting[msg.request_id]
            self._finish(msg.request_id, answered=True)
            if not waiting.future.done():
                waiting.future.set_result([waiting.results[i] for i in range(waiting.count)])
                self._unclaimed[msg.request_id] = waiting.future
                if len(self._unclaimed) > self._remember:
                    self._unclaimed.popitem(last=False)

    async def _run(self) -> None:
        while True:
            try:
                if self._unacked:
                    await self.broker.ack(self.topic, self.group, self._unacked)
                    self._unacked = []
                deliveries = await self.broker.consume(
                    self.topic, self.group, self.consumer, count=self.batch, block_ms=self.block_ms
                )
                for d in deliveries:
                    self._route(d)
                # Stored in the futures: now the reply entries can go.
                self._unacked = [d.id for d in deliveries]
                if self._unacked:
                    await self.broker.ack(self.topic, self.group, self._unacked)
                    self._unacked = []
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the loop outlives any one failure (broker down, ...)
                log.warning("result router on %r: %s; retrying", self.topic, e)
                await asyncio.sleep(self.retry_s)

    async def close(self) -> None:
        """Stop the loop, fail every waiting request, and drop the reply topic."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for request_id, waiting in list(self._waiting.items()):
            if not waiting.future.done():
                waiting.future.set_exception(BrokerError("result router closed"))
            self._finish(request_id, answered=False)
        self._waiting.clear()
        self._unclaimed.clear()
        if self.delete_on_close:
            try:
                await self.broker.delete_topic(self.topic)
            except BrokerError as e:
                log.warning("could not delete reply topic %r: %s", self.topic, e)
