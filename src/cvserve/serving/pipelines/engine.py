"""Serving one pipeline: admission, stage A in a preprocessing thread, fan-out through
the broker to stage B workers, the join, and the time of every hop in the trace.

Trace of a pipeline request (contiguous, like a model's): ``recv``, ``queue``, stage A's
``decode``/``resize``/``infer``/``postprocess``; then, for the item whose result came
last, stage B's ``infer`` and ``postprocess`` as its worker measured them, and ``broker``
for the rest of the round trip (publish, the hop to a worker, waiting in its batch, the
hop back); finally the join (``postprocess``) and ``encode``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cvserve.brokers import (
    Broker,
    BrokerFull,
    BrokerUnavailable,
    Message,
    ResultRouter,
    ResultTimeout,
    StageWorker,
)
from cvserve.brokers.worker import ERROR
from cvserve.config import PipelineConfig
from cvserve.serving.core import Admission, Prediction, PreprocessPool
from cvserve.serving.errors import BrokerDown, DeadlineExceeded, Overloaded, StageFailed
from cvserve.serving.pipelines import get_kind
from cvserve.serving.pipelines.base import BATCH, INFER_S, POST_S, StageOptions
from cvserve.serving.stats import ModelStats
from cvserve.tasks.params import describe_params, parse_params
from cvserve.trace import Trace

log = logging.getLogger(__name__)


def work_topic(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


class StageBRunner:
    """Stage B workers of one process: ``instances`` StageWorkers, each with its own model
    sessions on its own thread, consuming the stage's topic as members of one group."""

    def __init__(self, config: PipelineConfig, broker: Broker, options: StageOptions) -> None:
        self.config = config
        self.broker = broker
        kind = get_kind(config.kind)
        self.topic = work_topic(config.name, kind.stage_b)
        self.group = kind.stage_b
        self.stages = [kind.make_stage_b(options) for _ in range(config.instances)]
        self.executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{config.name}-{kind.stage_b}-{i}")
            for i in range(config.instances)
        ]
        self.workers = [
            StageWorker(
                broker,
                self.topic,
                self.group,
                self._handler(i),
                batch=config.max_batch_size,
                block_ms=config.block_ms,
                reclaim_idle_ms=config.reclaim_idle_ms,
            )  # fmt: skip
            for i in range(config.instances)
        ]
        self._tasks: list[asyncio.Task] = []

    def _handler(self, i: int):
        stage, executor = self.stages[i], self.executors[i]

        async def handle(messages: list[Message]) -> list[Message]:
            return await asyncio.get_running_loop().run_in_executor(executor, stage.run, messages)

        return handle

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(w.run(), name=f"worker {self.topic}") for w in self.workers
        ]

    async def stop(self) -> None:
        for w in self.workers:
            w.stop()
        for t in self._tasks:
            try:
                await asyncio.wait_for(t, 10)
            except (TimeoutError, asyncio.CancelledError):
                t.cancel()
        for ex in self.executors:
            ex.shutdown(wait=True)


class PipelineServer:
    """Serves one pipeline in this process (stage A, and stage B unless ``workers=0``); a
    :class:`~cvserve.serving.core.Servable` like a model."""

    #: the join is cheap: it and the encoding of the answer stay on the event loop
    heavy = False

    def __init__(
        self,
        config: PipelineConfig,
        pool: PreprocessPool,
        broker: Broker,
        *,
        max_pixels: int = 64_000_000,
        cache_dir: str | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.pool = pool
        self.broker = broker
        self.kind = get_kind(config.kind)
        self.options = StageOptions(
            intra_op_threads=config.intra_op_threads,
            max_pixels=max_pixels,
            cache_dir=cache_dir,
            params=dict(config.params),
        )
        self.stage_a = self.kind.make_stage_a(self.options)
        self.topic = work_topic(config.name, self.kind.stage_b)
        self.router = ResultRouter(broker, topic=f"{config.name}.replies.{uuid.uuid4().hex[:12]}")
        self.local = (
            StageBRunner(config.with_instances(config.workers), broker, self.options)
            if config.workers
            else None
        )
        self.admission = Admission(f"pipeline {self.name}", config.max_queue)
        self.stats = ModelStats(self.name)
        self.params = tuple(self.kind.params)
        self.ready = False

    def warm_up(self) -> None:
        """One blank image through stage A, so the first request pays no session warm-up."""
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (256, 256), "white").save(buf, "PNG")
        self.stage_a.run(buf.getvalue())

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.warm_up)
        await self.broker.create_group(self.topic, self.kind.stage_b)
        await self.router.start()
        if self.local is not None:
            await self.local.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.local is not None:
            await self.local.stop()
        await self.router.close()

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def parse_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return parse_params(self.params, given)

    async def predict(
        self, data: bytes, trace: Trace, deadline: float, params: dict[str, Any]
    ) -> Prediction:
        with self.admission.admit():
            fan = await self.pool.submit(
                trace, self.stage_a.run, data, deadline=deadline, fail_stage="decode"
            )
            results: list[Message] = []
            if fan.items:
                results = await self._fan_out(fan.items, trace, deadline)
            t0 = time.perf_counter()
            result = self.kind.join(fan.context, results, **params)
            trace.add("postprocess", time.perf_counter() - t0)
            trace.advance(time.perf_counter())
            batch = max((int(r.headers.get(BATCH, 1)) for r in results), default=1)
            return Prediction(result=result, batch_size=batch, image_size=fan.image_size)

    async def _fan_out(self, items, trace: Trace, deadline: float) -> list[Message]:
        request_id = uuid.uuid4().hex
        fut = self.router.expect(request_id, len(items))
        sent = time.perf_counter()
        try:
            # One round trip for the whole fan-out where the broker can (Redis).
            await self.broker.publish_many(
                self.topic,
                [
                    Message(request_id=request_id, index=i, arrays=a, reply_to=self.router.topic)
                    for i, a in enumerate(items)
                ],
                timeout=max(0.001, deadline - time.perf_counter()),
            )
            deliveries = await self.router.wait(
                request_id, len(items), timeout=max(0.0, deadline - time.perf_counter())
            )
        except BrokerUnavailable as e:
            self.router.forget(request_id)
            trace.mark("broker")
            raise BrokerDown(f"broker unavailable: {e}") from None
        except BrokerFull as e:
            self.router.forget(request_id)
            trace.mark("broker")
            raise Overloaded(
                f"pipeline {self.name}: stage backlog full ({e})", retry_after_s=1
            ) from None
        except ResultTimeout:
            trace.mark("broker")
            raise DeadlineExceeded(
                f"deadline passed waiting for {len(items)} {self.kind.stage_b} results"
            ) from None
        finally:
            if not fut.done():
                fut.cancel()
        done = time.perf_counter()
        results = [d.message for d in deliveries]
        failed = [r for r in results if ERROR in r.headers]
        if failed:
            raise StageFailed(f"stage {self.kind.stage_b} failed: {failed[0].headers[ERROR]}")
        # The item that came back last bounds the request; charge its worker's own time.
        last = max(deliveries, key=lambda d: d.consumed_at).message.headers
        infer = float(last.get(INFER_S, 0.0))
        post = float(last.get(POST_S, 0.0))
        trace.add("broker", max(0.0, (done - sent) - infer - post))
        trace.add("infer", infer)
        trace.add("postprocess", post)
        trace.advance(done)
        return results

    @property
    def task(self) -> str:
        return self.kind.task

    @property
    def timeout_ms(self) -> float:
        return self.config.timeout_ms

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {
            "name": self.name,
            "kind": c.kind,
            "task": self.kind.task,
            "ready": self.ready,
            "stages": [self.kind.stage_a, self.kind.stage_b],
            "topic": self.topic,
            "local_workers": c.workers,
            "max_batch_size": c.max_batch_size,
            "max_queue": c.max_queue,
            "timeout_ms": c.timeout_ms,
            "parameters": describe_params(self.params),
            "models": self.kind.describe(self.options),
        }
