"""Results back to the request that waits for them: one reply topic per serving process.

The serving process registers a request (``expect``) *before* publishing its work, with
``reply_to=router.topic`` on every work message, then awaits ``wait`` (or the future that
``expect`` returned). The ``ResultRouter`` consumes the reply topic and resolves the
request once all ``count`` items (indices ``0..count-1``) have arrived, in index order;
results that arrive before ``wait`` is called are kept for it. Reclaimed work can produce a second result for an item:
results are deduplicated by ``(request_id, index)``, so every request is answered once.
A request whose results do not all arrive in time fails with ``ResultTimeout``; results
arriving later are acknowledged and counted as ``late``, never delivered.

Nothing waits for work that no longer exists. ``publish`` sends a request's items and
keeps them until the request is answered. A watch task asks the broker for its ``epoch``
every ``check_s``: when it changed (the broker restarted without its data, or failed
over), the reply topic is made again and every unanswered item published again (a result
that still comes from the old copy is a duplicate, dropped); when the broker stays
unreachable for ``outage_s``, every waiting request fails with ``BrokerUnavailable`` (a
503 at the edge), not at its deadline. The watch also refreshes the reply topic's expiry
(``ttl_s``), so the reply topic of a process that died disappears after ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from .base import Broker
from .errors import BrokerError, BrokerFull, BrokerUnavailable, ResultTimeout
from .message import Delivery, Message

log = logging.getLogger(__name__)


@dataclass
class RouterStats:
    """Counts of results that did not answer anything, by reason."""

    routed: int = 0
    duplicates: int = 0  # a second result for an item (reclaimed work finished twice)
    late: int = 0  # the request had timed out or been forgotten
    unknown: int = 0  # no such request was expected, or an index out of range
    republished: int = 0  # items published again after the broker lost them
    withdrawn: int = 0  # unstarted items taken back: their request timed out or went away
    abandoned: int = 0  # requests failed because the broker stayed unreachable


@dataclass
class _Waiting:
    future: asyncio.Future[list[Delivery]]
    count: int
    results: dict[int, Delivery] = field(default_factory=dict)
    topic: str = ""  # where ``items`` were published (by ``publish``)
    items: list[Message] | None = None  # kept to publish again if the broker loses them
    ids: list[str] = field(default_factory=list)  # their entry ids (to withdraw them)


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
        ttl_s: float | None = None,
        check_s: float = 0.5,
        outage_s: float | None = None,
    ) -> None:
        self.broker = broker
        self.topic = topic or f"replies.{uuid.uuid4().hex[:16]}"
        self.group = group
        self.consumer = self.topic
        self.batch = batch
        self.block_ms = block_ms
        self.retry_s = retry_s
        self.delete_on_close = delete_on_close
        self.ttl_s = ttl_s
        self.check_s = check_s if ttl_s is None else min(check_s, ttl_s / 3)
        self.outage_s = outage_s
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
        self._background: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._epoch: str | None = None
        self._down_since: float | None = None
        self._refused = ""  # the last refusal the watch logged (logged once, not per check)

    async def start(self) -> ResultRouter:
        await self.broker.create_group(self.topic, self.group)
        if self.ttl_s is not None:
            await self.broker.keep_alive(self.topic, self.ttl_s)
        self._epoch = await self.broker.epoch()
        self._task = asyncio.create_task(self._run(), name=f"result-router {self.topic}")
        self._watcher = asyncio.create_task(self._watch(), name=f"result-watch {self.topic}")
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

    async def publish(
        self, topic: str, messages: list[Message], *, timeout: float | None = None
    ) -> asyncio.Future[list[Delivery]]:
        """Publish one request's items to ``topic`` with replies to this router; returns
        the future of their results, as ``expect`` does (then ``wait`` for them).

        ``messages`` share one request id and have indices ``0..n-1``; their ``reply_to``
        is set here. They are kept until the request is answered or forgotten, to be
        published again if the broker loses them. A failed publish forgets the request.
        """
        if not messages:
            raise ValueError("nothing to publish")
        request_id = messages[0].request_id
        if sorted(m.index for m in messages) != list(range(len(messages))) or any(
            m.request_id != request_id for m in messages
        ):
            raise ValueError("publish takes one request's items, indices 0..n-1")
        for m in messages:
            m.reply_to = self.topic
        fut = self.expect(request_id, len(messages))
        try:
            ids = await self.broker.publish_many(topic, messages, timeout=timeout)
        except BaseException:
            self.forget(request_id)
            raise
        waiting = self._waiting.get(request_id)
        if waiting is not None:  # not answered in the meantime
            waiting.topic, waiting.items, waiting.ids = topic, messages, list(ids or [])
        return fut

    async def wait(
        self, request_id: str, count: int = 1, timeout: float | None = None
    ) -> list[Delivery]:
        """Await the results of a request (``expect`` it first unless already done)."""
        answered = self._unclaimed.pop(request_id, None)
        if answered is not None:
            return answered.result()  # or raises what failed it
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
        finally:
            self._unclaimed.pop(request_id, None)
        return results

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request; its results, if they come, are counted as late.
        Its items no worker has taken yet are withdrawn from the broker (in the
        background): nobody waits for their results any more."""
        self._unclaimed.pop(request_id, None)
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            if not waiting.future.done():
                waiting.future.cancel()
            self._finish(request_id, answered=False)
            missing = [
                i for m, i in zip(waiting.items or [], waiting.ids, strict=False)
                if m.index not in waiting.results
            ]  # fmt: skip
            if missing and waiting.topic:
                self._withdraw(waiting.topic, missing)

    def _withdraw(self, topic: str, ids: list[str]) -> None:
        async def go() -> None:
            try:
                self.stats.withdrawn += await self.broker.withdraw(topic, ids)
            except BrokerError as e:  # the deadline header still stops them at a worker
                log.debug("withdrawing %d items from %r failed: %s", len(ids), topic, e)

        try:
            task = asyncio.get_running_loop().create_task(go())
        except RuntimeError:  # no loop (closing): the deadline header does the rest
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
                self._keep_unclaimed(msg.request_id, waiting.future)

    def _keep_unclaimed(self, request_id: str, fut: asyncio.Future[list[Delivery]]) -> None:
        self._unclaimed[request_id] = fut
        if len(self._unclaimed) > self._remember:
            self._unclaimed.popitem(last=False)

    def _fail(self, request_id: str, error: BrokerError) -> None:
        """Answer a waiting request with ``error``; its results, if they come, are late."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is None:
            return
        self._finish(request_id, answered=False)
        if not waiting.future.done():
            waiting.future.set_exception(error)
            self._keep_unclaimed(request_id, waiting.future)

    async def _watch(self) -> None:
        """Refresh the reply topic's expiry; notice a broker that lost its data (publish
        again) or stays unreachable (fail the waiting requests)."""
        next_keep_alive = time.monotonic() + (self.ttl_s or 0.0) / 3
        while True:
            await asyncio.sleep(self.check_s)
            now = time.monotonic()
            try:
                epoch = await self.broker.epoch()
                if self._down_since is not None:
                    log.info("broker back for %r after %.1f s", self.topic, now - self._down_since)
                    self._down_since = None
                if epoch != self._epoch:
                    await self._republish()
                    self._epoch = epoch
                    next_keep_alive = now + (self.ttl_s or 0.0) / 3
                elif self.ttl_s is not None and now >= next_keep_alive:
                    await self.broker.keep_alive(self.topic, self.ttl_s)
                    next_keep_alive = now + self.ttl_s / 3
            except asyncio.CancelledError:
                raise
            except BrokerUnavailable as e:
                next_keep_alive = 0.0  # refresh as soon as it answers again
                if self._down_since is None:
                    self._down_since = now
                down_s = now - self._down_since
                if self.outage_s is not None and down_s >= self.outage_s and self._waiting:
                    log.warning(
                        "broker unreachable for %.1f s: failing %d waiting requests (%s)",
                        down_s,
                        len(self._waiting),
                        e,
                    )
                    error = BrokerUnavailable(
                        f"broker unreachable for {down_s:.1f} s while the request waited "
                        f"for its results (limit {self.outage_s:g} s): {e}"
                    )
                    for request_id in list(self._waiting):
                        self._fail(request_id, error)
                        self.stats.abandoned += 1
            except BrokerError as e:  # it answers, but refuses (an ACL without SET, ...)
                if str(e) != self._refused:
                    log.warning("result watch on %r: %s; retrying", self.topic, e)
                    self._refused = str(e)
            except Exception:  # the watch outlives any one failure
                log.exception("result watch on %r", self.topic)

    async def _republish(self) -> None:
        """The broker lost its data: make the reply topic again, then publish every item
        that is still unanswered (only items ``publish`` sent: the router holds those)."""
        await self.broker.create_group(self.topic, self.group)
        if self.ttl_s is not None:
            await self.broker.keep_alive(self.topic, self.ttl_s)
        items = requests = 0
        for request_id, waiting in list(self._waiting.items()):
            if not waiting.items:
                continue
            missing = [m for m in waiting.items if m.index not in waiting.results]
            if not missing:
                continue
            try:
                await self.broker.publish_many(waiting.topic, missing)
            except BrokerFull as e:
                self._fail(request_id, e)
                continue
            waiting.ids = []  # new entries: not withdrawn (their deadline stops them)
            items += len(missing)
            requests += 1
        self.stats.republished += items
        log.warning(
            "broker lost its data (epoch changed): published %d unanswered items of %d "
            "requests again",
            items,
            requests,
        )

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
        for task in (self._task, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._watcher = None
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
