"""A stage consumer: consume a batch, run the stage, publish each result, *then* acknowledge.

This is the loop a pipeline worker (``cvserve worker``, a stage process) runs, once per
instance. Several consumers (tasks, processes or hosts) on one topic and group share its
load. A consumer also reclaims entries that another consumer left pending for ``reclaim_idle_ms``
(it died before acknowledging), so no work is lost; that work may then have been done
twice, and the results are deduplicated where they are joined (``ResultRouter``). While a
batch runs, its worker touches its entries every ``reclaim_idle_ms / 3`` (``Broker.touch``),
so a slow batch of a live worker is not taken over, for at most ``hang_ms``: a batch that
runs longer counts as hung, and its entries become reclaimable.

Reclaimed entries are served one at a time, alone, so an entry that kills its worker
takes no batch-mate down with it twice. An entry reclaimed for the
``max_deliveries + 1``-th time (it killed or hung every worker that took it) is not run
again: it is moved to the dead letters (``<topic>.dead``) and its
request is answered at once with an ``error`` result that says so. Results go to reply
topics through ``publish_reply``, which never keeps the reply topic of a server that is
gone alive (a result it drops is counted as ``orphaned``; the work is acknowledged).
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

from cvserve import otel

from .base import DEFAULT_MAX_DELIVERIES, Broker, dead_topic
from .errors import BrokerError
from .message import Delivery, Message

log = logging.getLogger(__name__)

#: Result header: the work message's publish-to-consume time (the ``broker`` stage).
BROKER_S = "broker_s"
#: Result header set when the stage failed for this item; the text says why.
ERROR = "error"
#: Result header beside ``error`` when the item was dead-lettered: ``<topic>.dead <id>``.
DEAD_LETTER = "dead_letter"
#: Result header beside ``error`` when the item failed run alone (its batch-mates did not
#: cause it); absent when its whole part of the batch failed (see ``StageConsumer``).
FAILED_ALONE = "failed_alone"

#: Default ``reclaim_idle_ms``: how long an entry is left with a silent consumer before
#: another takes it over. Live workers touch their entries (heartbeat), so this only has
#: to outlast a missed touch, and a crashed worker's items (or a poison item's
#: ``max_deliveries`` runs) are settled well within a request's 30 s default deadline.
DEFAULT_RECLAIM_IDLE_MS = 5_000
#: Default ``hang_ms``: a batch running longer stops being touched (counts as hung).
DEFAULT_HANG_MS = 120_000

BatchHandler = Callable[[list[Message]], Awaitable[list[Message]]]


def consumer_name() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class ConsumerStats:
    processed: int = 0
    reclaimed: int = 0
    failed: int = 0  # items answered with an error header
    reruns: int = 0  # handler calls on part of a failed batch, to find the failing items
    dead_lettered: int = 0  # moved to the dead letters after max_deliveries
    orphaned: int = 0  # results dropped: their reply topic was gone (in-process)
    expired: int = 0  # items dropped unrun: their request's deadline had passed


class StageConsumer:
    """Serves one stage from ``topic`` as a member of ``group``.

    ``handler`` gets a batch of work messages and returns one result per message, in
    order (build them with ``Message.reply``). If it raises, or returns the wrong
    number of results, the batch is bisected: both halves run again, a half that fails
    is split again, and an item that fails alone is answered with an ``error`` header
    (and ``failed_alone``), so one malformed or poison item fails only itself and its
    batch-mates get their results. When both halves of a failed part fail (a handler
    broken for every input, or bad items on both sides), that part is answered with
    ``error`` as a whole: one bad item of n costs at most 2*ceil(log2(n)) more handler
    calls, a broken handler 2. Every message is answered exactly once either way.
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
        reclaim_idle_ms: int = DEFAULT_RECLAIM_IDLE_MS,
        retry_s: float = 0.2,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        hang_ms: int = DEFAULT_HANG_MS,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        self.broker = broker
        self.topic = topic
        self.group = group
        self.handler = handler
        self.consumer = consumer or consumer_name()
        self.batch = batch
        self.block_ms = block_ms
        self.reclaim_idle_ms = reclaim_idle_ms
        self.retry_s = retry_s
        self.max_deliveries = max_deliveries
        self.hang_ms = hang_ms
        self.stats = ConsumerStats()
        self._stop = asyncio.Event()
        self._next_reclaim = 0.0
        #: seconds a batch has taken lately (see ``serve``)
        self.run_s = 0.0
        #: called with the number of items dropped past their deadline (metrics)
        self.on_expired: Callable[[int], None] | None = None
        #: result header -> stage (seconds) its trace spans show (``cvserve.otel``)
        self.span_stages: dict[str, str] = {}

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
            # One at a time, served alone: a reclaimed item may be what killed its last
            # worker, so it takes no batch-mate down with it, and only its own delivery
            # count grows. While there is more to take over, look again at once.
            deliveries = await self.broker.reclaim(
                self.topic, self.group, self.consumer, min_idle_ms=self.reclaim_idle_ms, count=1
            )
            self._next_reclaim = now + (0 if deliveries else self.reclaim_idle_ms / 2000)
            self.stats.reclaimed += len(deliveries)
            deliveries = [d for d in deliveries if not await self._dead_letter_if_due(d)]
        if not deliveries:
            deliveries = await self.broker.consume(
                self.topic, self.group, self.consumer, count=self.batch, block_ms=self.block_ms
            )
        if deliveries:
            await self.serve(deliveries)
        return len(deliveries)

    async def serve(self, deliveries: list[Delivery]) -> None:
        """Run the handler on ``deliveries``, publish the results, then acknowledge.

        Items whose request deadline (``DEADLINE`` header) has passed, or will have
        passed by the time a batch like the recent ones finishes (``run_s``), are
        acknowledged unrun and answer nothing: their request has (or will have) its
        answer, a 504, before their result could reach it."""
        now = time.time() + self.run_s
        late = [d for d in deliveries if d.message.expired(now)]
        if late:
            await self.broker.ack(self.topic, self.group, [d.id for d in late])
            self.stats.expired += len(late)
            if self.on_expired is not None:
                self.on_expired(len(late))
            log.debug("stage %r: dropped %d items past their deadline", self.topic, len(late))
            deliveries = [d for d in deliveries if not d.message.expired(now)]
            if not deliveries:
                return
        messages = [d.message for d in deliveries]
        heartbeat = asyncio.create_task(self._heartbeat([d.id for d in deliveries]))
        try:
            t0 = time.monotonic()
            results = await self._results(messages)
            # what a batch takes, recently (smoothed): an item that cannot finish before its
            # deadline is not started
            took = time.monotonic() - t0
            self.run_s = took if self.run_s == 0 else 0.7 * self.run_s + 0.3 * took
            for d, result in zip(deliveries, results, strict=True):
                # The result answers this item, whatever the handler put in its fields.
                result.request_id, result.index = d.message.request_id, d.message.index
                result.headers.setdefault(BROKER_S, d.broker_s)
                await self._reply(d, result)
        finally:
            heartbeat.cancel()
        if otel.enabled():
            otel.worker_spans(
                self.topic,
                [(d.message.headers, r.headers) for d, r in zip(deliveries, results, strict=True)],
                published=[d.message.published_at for d in deliveries],
                consumed=[d.consumed_at for d in deliveries],
                done=time.time(),
                stage_headers=self.span_stages,
                error_header=ERROR,
                attributes={"cvserve.consumer": self.consumer, "cvserve.batch_size": len(deliveries)},
            )  # fmt: skip
        # Acknowledge only now that every result is stored: a crash before this point
        # leaves the work pending, to be reclaimed and redone.
        await self.broker.ack(self.topic, self.group, [d.id for d in deliveries])
        self.stats.processed += len(deliveries)

    async def _results(self, messages: list[Message]) -> list[Message]:
        """One result per message: the handler's, or an ``error`` for the items that
        make it fail (found by bisection, see the class)."""
        try:
            return await self._call(messages)
        except Exception as e:
            log.warning("stage %r failed on a batch of %d: %s: %s", self.topic, len(messages),
                        type(e).__name__, e, exc_info=True)  # fmt: skip
            results: list[Message | None] = [None] * len(messages)
            await self._bisect(messages, 0, len(messages), e, results)
            assert all(r is not None for r in results)
            return results  # type: ignore[return-value]

    async def _call(self, messages: list[Message]) -> list[Message]:
        results = await self.handler(messages)
        if len(results) != len(messages):
            raise RuntimeError(f"handler returned {len(results)} results for {len(messages)}")
        return results

    async def _bisect(
        self, messages: list[Message], a: int, b: int, error: Exception, out: list
    ) -> None:
        """Items ``a:b`` failed together with ``error``: fill ``out[a:b]``."""
        if b - a == 1:
            out[a] = self._error(messages[a], error, alone=True)
            return
        mid = (a + b) // 2
        errors = []
        for lo, hi in ((a, mid), (mid, b)):
            self.stats.reruns += 1
            try:
                out[lo:hi] = await self._call(messages[lo:hi])
                errors.append(None)
            except Exception as e:
                errors.append(e)
        if all(e is not None for e in errors):  # broken for all, or bad items on both sides
            for (lo, hi), e in zip(((a, mid), (mid, b)), errors, strict=True):
                for i in range(lo, hi):
                    out[i] = self._error(messages[i], e, alone=hi - lo == 1)
            return
        for (lo, hi), e in zip(((a, mid), (mid, b)), errors, strict=True):
            if e is not None:
                await self._bisect(messages, lo, hi, e, out)

    def _error(self, message: Message, error: Exception, *, alone: bool) -> Message:
        self.stats.failed += 1
        if alone:
            log.warning("stage %r failed on item %d of request %r alone: %s: %s", self.topic,
                        message.index, message.request_id, type(error).__name__, error)  # fmt: skip
        headers: dict = {ERROR: f"{type(error).__name__}: {error}"}
        if alone:
            headers[FAILED_ALONE] = True
        return message.reply(headers=headers)

    async def _heartbeat(self, ids: list[str]) -> None:
        """Touch ``ids`` every ``reclaim_idle_ms / 3`` until cancelled or ``hang_ms``."""
        every = self.reclaim_idle_ms / 3000.0
        give_up = time.monotonic() + self.hang_ms / 1000.0
        while True:
            await asyncio.sleep(every)
            if time.monotonic() >= give_up:
                log.warning(
                    "worker %s: a batch of %d on %r has run over hang_ms=%d; its items may "
                    "now be taken over", self.consumer, len(ids), self.topic, self.hang_ms,
                )  # fmt: skip
                return
            try:
                await self.broker.touch(self.topic, self.group, self.consumer, ids)
            except BrokerError as e:  # the broker is away: reclaim may follow, as before
                log.debug("worker %s: touch failed: %s", self.consumer, e)

    async def _reply(self, d: Delivery, result: Message) -> None:
        if not d.message.reply_to:
            return
        if await self.broker.publish_reply(d.message.reply_to, result) is None:
            self.stats.orphaned += 1
            log.info(
                "reply topic %r of request %r is gone (its server stopped): result dropped",
                d.message.reply_to,
                d.message.request_id,
            )

    async def _dead_letter_if_due(self, d: Delivery) -> bool:
        """Dead-letter ``d`` if it has been delivered more than ``max_deliveries`` times,
        and answer its request with an error; True when it is no longer this worker's."""
        if d.deliveries <= self.max_deliveries:
            return False
        ran = d.deliveries - 1
        ran_text = (
            "it ran once and its worker"
            if ran == 1
            else f"it ran {ran} times and each time its worker"
        )
        reason = (
            f"was delivered {d.deliveries} times, more than max_deliveries="
            f"{self.max_deliveries}: {ran_text} died, hung or lost the broker before "
            "acknowledging it"
        )
        dead_id = await self.broker.dead_letter(
            d, self.group, reason=reason, consumer=self.consumer
        )
        if dead_id is None:  # finished by another consumer meanwhile
            return True
        where = f"{dead_topic(self.topic)} {dead_id}"
        log.error(
            "item %d of request %r on %r: %s; moved to dead letters as %s",
            d.message.index,
            d.message.request_id,
            self.topic,
            reason,
            where,
        )
        self.stats.dead_lettered += 1
        # Moved first, answered next: a crash in between leaves the request to its deadline
        # (answered once, late), never an error for an item whose work was finished.
        error = d.message.reply(
            headers={ERROR: f"item {d.message.index} {reason}", DEAD_LETTER: where}
        )
        await self._reply(d, error)
        return True
