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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cvserve.brokers import (
    Broker,
    BrokerFull,
    BrokerUnavailable,
    Message,
    ResultRouter,
    ResultTimeout,
    StageConsumer,
)
from cvserve.brokers.consumer import DEAD_LETTER, ERROR
from cvserve.config import PipelineConfig
from cvserve.runtime.budget import CpuBudget
from cvserve.serving.core import Admission, Prediction, PreprocessPool
from cvserve.serving.errors import BrokerDown, DeadlineExceeded, Overloaded, StageFailed
from cvserve.serving.pipelines import get_kind
from cvserve.serving.pipelines.base import (
    BATCH,
    INFER_S,
    POST_S,
    SIMULATED,
    StageOptions,
    describe_runtime,
)
from cvserve.serving.stats import ModelStats
from cvserve.tasks.params import describe_params, parse_params
from cvserve.trace import Trace

log = logging.getLogger(__name__)


def work_topic(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def cpu_budget(
    config: PipelineConfig, pressure: Callable[[], int] | None = None
) -> CpuBudget | None:
    """The cores this process's stages of ``config`` share (None: no budget);
    ``pressure``: requests in flight, where this process knows them."""
    return None if config.cores < 0 else CpuBudget(config.cores, pressure)


def runtime_options(config: PipelineConfig) -> dict[str, Any]:
    """The StageOptions fields that say what the stages' DNNs run on."""
    return {"runtime": config.runtime, "sim_profile": config.sim_profile,
            "sim_devices": config.sim_devices}  # fmt: skip


class StageBRunner:
    """Stage B workers of one process: ``instances`` StageConsumers, each with its own model
    sessions on its own thread, consuming the stage's topic as members of one group."""

    def __init__(self, config: PipelineConfig, broker: Broker, options: StageOptions) -> None:
        self.config = config
        self.broker = broker
        kind = get_kind(config.kind)
        self.topic = work_topic(config.name, kind.stage_b)
        self.group = kind.stage_b
        self.options = options
        self.stages = [kind.make_stage_b(options) for _ in range(config.instances)]
        self.executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{config.name}-{kind.stage_b}-{i}")
            for i in range(config.instances)
        ]
        self.workers = [
            StageConsumer(
                broker,
                self.topic,
                self.group,
                self._handler(i),
                batch=config.max_batch_size,
                block_ms=config.block_ms,
                reclaim_idle_ms=config.reclaim_idle_ms,
                max_deliveries=config.max_deliveries,
            )  # fmt: skip
            for i in range(config.instances)
        ]
        self._tasks: list[asyncio.Task] = []

    def _handler(self, i: int):
        stage, executor = self.stages[i], self.executors[i]
        simulated = self.options.simulated

        async def handle(messages: list[Message]) -> list[Message]:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, stage.run, messages
            )
            if simulated:  # the server marks the request sim=1 (Server-Timing)
                for r in results:
                    r.headers[SIMULATED] = 1
            return results

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
    """Serves one pipeline in this process (stage A, and stage B unless
    ``stage_workers=0``); a :class:`~cvserve.serving.core.Servable` like a model."""

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
            # the admission counts this pipeline's requests in flight (made below)
            budget=cpu_budget(config, pressure=lambda: self.admission.inflight),
            **runtime_options(config),
        )
        self.stage_a = self.kind.make_stage_a(self.options)
        budget = self.options.budget
        #: stage B workers here: by default one per core of the budget, so that under load
        #: every core runs a one-core call (with one, the costlier stage caps throughput)
        self.local_workers = (
            config.stage_workers
            if config.stage_workers is not None
            else (budget.cores if budget else 1)
        )
        self.topic = work_topic(config.name, self.kind.stage_b)
        self.router = ResultRouter(
            broker,
            topic=f"{config.name}.replies.{uuid.uuid4().hex[:12]}",
            ttl_s=config.reply_ttl_ms / 1000,
            outage_s=config.broker_outage_ms / 1000,
        )
        self.local = (
            StageBRunner(config.with_instances(self.local_workers), broker, self.options)
            if self.local_workers
            else None
        )
        wait = config.max_queue_wait_ms
        self.admission = Admission(
            f"pipeline {self.name}", config.max_queue,
            max_wait_s=None if wait is None else wait / 1000.0,
            round_rows=pool.threads,
        )  # fmt: skip
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
        await self.broker.ping()  # a wrong password fails here, before any warm-up
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
        with self.admission.admit(deadline):
            fan = await self.pool.submit(
                trace, self.stage_a.run, data, deadline=deadline, fail_stage="decode"
            )
            if self.options.simulated:
                trace.simulated = True
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
        fut = None
        sent = time.perf_counter()
        try:
            # One round trip for the whole fan-out where the broker can (Redis); the router
            # keeps the items until answered, to publish them again if the broker loses them.
            fut = await self.router.publish(
                self.topic,
                [Message(request_id=request_id, index=i, arrays=a) for i, a in enumerate(items)],
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
            if fut is not None and not fut.done():
                fut.cancel()
        done = time.perf_counter()
        results = [d.message for d in deliveries]
        failed = [r for r in results if ERROR in r.headers]
        if failed:
            detail = {}
            if DEAD_LETTER in failed[0].headers:  # where to look: `cvserve broker dead-letters`
                detail["dead_letter"] = str(failed[0].headers[DEAD_LETTER])
            raise StageFailed(
                f"stage {self.kind.stage_b} failed: {failed[0].headers[ERROR]}", **detail
            )
        # The item that came back last bounds the request; charge its worker's own time.
        last = max(deliveries, key=lambda d: d.consumed_at).message.headers
        if any(SIMULATED in r.headers for r in results):
            trace.simulated = True
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
            "broker": self.broker.safe_url,  # never the password
            "max_deliveries": c.max_deliveries,
            "local_workers": self.local_workers,
            "max_batch_size": c.max_batch_size,
            "max_queue": c.max_queue,
            "timeout_ms": c.timeout_ms,
            "parameters": describe_params(self.params),
            "models": self.kind.describe(self.options),
            # stage A's, and stage B's here (a `cvserve worker` reports its own at start)
            "runtime": describe_runtime(self.options),
            "cpu": self.describe_cpu(),
        }

    def describe_cpu(self) -> dict[str, Any]:
        """How the stages share the CPU here: who runs where with how many threads, and
        (with a budget) what each stage has used since start."""
        budget = self.options.budget
        split: dict[str, Any] = {
            self.kind.stage_a: {"runs_in": "preprocessing pool", "threads": self.pool.threads},
            self.kind.stage_b: {"runs_in": "stage B workers", "workers": self.local_workers},
        }
        if budget is None:
            return {
                "budget": None,
                "stages": split,
                "intra_op_threads": self.config.intra_op_threads,
            }
        wide = budget.widest(self.config.intra_op_threads)
        use = budget.snapshot()
        return {
            "budget": {"cores": budget.cores, "widths": sorted({1, wide}), "free": use["free"]},
            "stages": split,
            # per DNN: calls, core-seconds, seconds running/waiting for a core, mean width
            "use": use["stages"],
        }
