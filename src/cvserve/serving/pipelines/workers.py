"""The workers of one broker step in one process (the server's own, or a ``cvserve
worker``'s): ``instances`` StageConsumers, each with its own model sessions on its own
thread, members of the step's consumer group on its topic ``<pipeline>.<step>``."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from cvserve.brokers import Broker, Message, StageConsumer
from cvserve.config import PipelineConfig
from cvserve.config.graph import Step
from cvserve.runtime.budget import CpuBudget
from cvserve.serving.pipelines.base import INFER_S, POST_S, SIMULATED, StageOptions
from cvserve.serving.pipelines.steps import make_step


def work_topic(pipeline: str, stage: str) -> str:
    return f"{pipeline}.{stage}"


def step_options(step: Step, options: StageOptions) -> StageOptions:
    """``options`` for ``step``: its own CPU budget when it has a share (``cores``)."""
    if step.cores and options.budget is not None:
        return replace(options, budget=CpuBudget(step.cores), _sim=options._sim)
    return options


class StepWorkers:
    """The workers of one broker step in one process: ``instances`` StageConsumers, each
    with its own model sessions on its own thread, members of the step's group."""

    def __init__(
        self, config: PipelineConfig, step: Step, broker: Broker, options: StageOptions,
        instances: int | None = None,
    ) -> None:  # fmt: skip
        self.step = step
        self.topic = work_topic(config.name, step.name)
        self.group = step.name
        self.options = step_options(step, options)
        n = instances or step.instances or config.instances
        self.impls = [make_step(step, self.options) for _ in range(n)]
        self.executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"{config.name}-{step.name}-{i}")
            for i in range(n)
        ]
        self.workers = [
            StageConsumer(
                broker,
                self.topic,
                self.group,
                self._handler(i),
                batch=step.max_batch_size or config.max_batch_size,
                block_ms=config.block_ms,
                reclaim_idle_ms=config.reclaim_idle_ms,
                max_deliveries=config.max_deliveries,
            )  # fmt: skip
            for i in range(n)
        ]
        for w in self.workers:  # what a trace shows of each item (cvserve.otel)
            w.span_stages = {INFER_S: "infer", POST_S: "postprocess"}
        self._tasks: list[asyncio.Task] = []

    def _handler(self, i: int):
        impl, executor = self.impls[i], self.executors[i]
        simulated = self.options.simulated

        async def handle(messages: list[Message]) -> list[Message]:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, impl.run_messages, messages
            )
            if simulated:  # the server marks the request sim=1 (Server-Timing)
                for r in results:
                    r.headers[SIMULATED] = 1
            return results

        return handle

    def counts(self) -> dict[str, int]:
        keys = ("processed", "expired", "failed", "reclaimed", "dead_lettered")
        return {k: sum(getattr(w.stats, k) for w in self.workers) for k in keys}

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
