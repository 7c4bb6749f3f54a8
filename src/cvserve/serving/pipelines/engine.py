"""Serving one declared pipeline (``config.graph``): admission, decoding, each step as
soon as its input is ready (steps on one input run at the same time), steps marked
``via: broker`` through the broker to workers that batch items of every request, the
join of the answer, and the time of every hop in the trace.

Trace of a pipeline request: ``recv``, ``queue``, ``decode``; each step run here charges
its ``normalize``/``infer``/``postprocess``; a step over the broker charges, for the item
whose result came last, ``infer`` and ``postprocess`` as its worker measured them and
``broker`` for the rest of its round trip; the join is ``postprocess``. Steps that ran at
the same time are charged side by side (their sum can exceed the wall time).

Every item carries its request's deadline (``brokers.message.DEADLINE``): a worker drops
it unrun once it has passed, and a request that times out or whose client hangs up
withdraws its items that no worker has taken (``ResultRouter.forget``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from cvserve import otel
from cvserve.brokers import (
    Broker,
    BrokerFull,
    BrokerUnavailable,
    Message,
    ResultRouter,
    ResultTimeout,
)
from cvserve.brokers.consumer import DEAD_LETTER, ERROR
from cvserve.brokers.message import DEADLINE
from cvserve.config import PipelineConfig
from cvserve.config.graph import CROPS, IMAGE, POLYGONS, Graph, Step, build_graph
from cvserve.runtime.budget import CpuBudget
from cvserve.serving.core import Admission, Prediction, PreprocessPool
from cvserve.serving.errors import BrokerDown, DeadlineExceeded, Overloaded, StageFailed
from cvserve.serving.pipelines.answers import join_answer
from cvserve.serving.pipelines.base import (
    BATCH,
    INFER_S,
    POST_S,
    SIMULATED,
    StageOptions,
    describe_runtime,
)
from cvserve.serving.pipelines.steps import (
    ANSWER,
    HEIGHT,
    WIDTH,
    Crops,
    Gallery,
    ModelStep,
    crop_boxes,
    crop_polygons,
    filter_detections,
    make_step,
    model_meta,
)
from cvserve.serving.pipelines.workers import StepWorkers, step_options, work_topic
from cvserve.serving.stats import ModelStats
from cvserve.trace import Trace

log = logging.getLogger(__name__)


def cpu_budget(
    config: PipelineConfig, pressure: Callable[[], int] | None = None
) -> CpuBudget | None:
    """The cores this process's steps of ``config`` share (None: no budget);
    ``pressure``: requests in flight, where this process knows them."""
    return None if config.cores < 0 else CpuBudget(config.cores, pressure)


def runtime_options(config: PipelineConfig) -> dict[str, Any]:
    """The StageOptions fields that say what the steps' DNNs run on."""
    return {"runtime": config.runtime, "sim_profile": config.sim_profile,
            "sim_devices": config.sim_devices}  # fmt: skip


def load_graph(config: PipelineConfig, cache_dir: str | None) -> Graph:
    """``config``'s steps, ordered and type-checked (a model step's type is its task)."""
    return build_graph(
        config.graph_steps, lambda s: model_meta(s, cache_dir).task if s.kind == "model" else None
    )


@dataclass
class StepStats:
    """What one step did in this process (``GET /v1/pipelines/{p}``, ``/metrics``)."""

    calls: int = 0
    items: int = 0
    seconds: float = 0.0  # infer + postprocess as measured where it ran
    broker_s: float = 0.0  # for a broker step: the rest of the round trip
    largest_batch: int = 0
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> calls

    def record(self, items: int, seconds: float, batch: int, broker_s: float = 0.0) -> None:
        self.calls += 1
        self.items += items
        self.seconds += seconds
        self.broker_s += broker_s
        self.largest_batch = max(self.largest_batch, batch)
        self.batches[batch] = self.batches.get(batch, 0) + 1

    def describe(self) -> dict[str, Any]:
        return {"calls": self.calls, "items": self.items, "seconds": round(self.seconds, 6),
                "broker_seconds": round(self.broker_s, 6), "largest_batch": self.largest_batch,
                "batch_sizes": {str(k): v for k, v in sorted(self.batches.items())}}  # fmt: skip


@dataclass
class _Timed:
    """A step's value and the seconds it spent per trace stage (for ``pool.submit``)."""

    value: Any
    stages: dict[str, float]


@dataclass
class _Request:
    image: Any  # PIL image, upright RGB
    trace: Trace
    deadline: float  # perf_counter
    rid: str
    rgb: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self.rgb is None:
            self.rgb = np.asarray(self.image)
        return self.rgb


class PipelineServer:
    """Serves one declared pipeline in this process (its steps run here, and its broker
    steps' workers too unless ``stage_workers=0``); a ``Servable`` like a model."""

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
        metrics: Any = None,
    ) -> None:
        self.name = config.name
        #: ``on_step(step, items, batch, parts)`` and ``on_expired(step, n)`` (``/metrics``)
        self.on_step = metrics.step_observer(config.name) if metrics is not None else None
        on_expired = metrics.expired_observer(config.name) if metrics is not None else None
        self.config = config
        self.pool = pool
        self.broker = broker
        self.max_pixels = max_pixels
        self.options = StageOptions(
            intra_op_threads=config.intra_op_threads,
            max_pixels=max_pixels,
            cache_dir=cache_dir,
            params=dict(config.params),
            # the admission counts this pipeline's requests in flight (made below)
            budget=cpu_budget(config, pressure=lambda: self.admission.inflight),
            **runtime_options(config),
        )
        self.graph = load_graph(config, cache_dir)
        self.impls: dict[str, Any] = {}
        for s in self.graph.steps:
            if s.kind == "model":  # a broker step's spec sizes its crops; opened on use
                self.impls[s.name] = ModelStep(s, step_options(s, self.options))
            elif s.kind == "op" and s.via == "inprocess":
                self.impls[s.name] = make_step(s, step_options(s, self.options))
            elif s.kind == "gallery":
                self.impls[s.name] = Gallery(s)
        budget = self.options.budget
        #: broker-step workers here: by default one per core of the budget, so that under
        #: load every core runs a one-core call
        self.local_workers = (
            config.stage_workers
            if config.stage_workers is not None
            else (budget.cores if budget else 1)
        )
        self.router = ResultRouter(
            broker,
            topic=f"{config.name}.replies.{uuid.uuid4().hex[:12]}",
            ttl_s=config.reply_ttl_ms / 1000,
            outage_s=config.broker_outage_ms / 1000,
        )
        self.local = [
            StepWorkers(config, s, broker, self.options, s.instances or self.local_workers)
            for s in self.graph.broker_steps
            if self.local_workers
        ]
        wait = config.max_queue_wait_ms
        self.admission = Admission(
            f"pipeline {self.name}", config.max_queue,
            max_wait_s=None if wait is None else wait / 1000.0,
            round_rows=pool.threads,
        )  # fmt: skip
        self.stats = ModelStats(self.name)
        self.step_stats = {s.name: StepStats() for s in self.graph.steps}
        #: the step run with decoding in one trip to the pool: the first in-process model or
        #: op on the image (the detector of most pipelines)
        self.first = next(
            (s for s in self.graph.steps
             if s.source == IMAGE and s.via == "inprocess" and s.kind in ("model", "op")),
            None,
        )  # fmt: skip
        for w in self.local:
            for c in w.workers:
                if on_expired is not None:
                    c.on_expired = partial(on_expired, w.step.name)
        self.params = ()
        self.ready = False

    # --- life ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One blank image through the steps run here, so the first request pays no
        session warm-up."""
        from PIL import Image

        image = Image.new("RGB", (256, 256), "white")
        for s in self.graph.steps:
            impl = self.impls.get(s.name)
            if s.via != "inprocess" or impl is None:
                continue
            if isinstance(impl, ModelStep) and s.source == IMAGE:
                impl.run([impl.prepare_image(image)], [image.size])
            elif s.kind == "op" and s.target == "ocr_det":
                impl.run_image(np.asarray(image))

    async def start(self) -> None:
        await self.broker.ping()  # a wrong password fails here, before any warm-up
        await asyncio.get_running_loop().run_in_executor(None, self.warm_up)
        for s in self.graph.broker_steps:
            await self.broker.create_group(work_topic(self.name, s.name), s.name)
        await self.router.start()
        for w in self.local:
            await w.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for w in self.local:
            await w.stop()
        await self.router.close()

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def parse_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        from cvserve.tasks.params import parse_params

        return parse_params(self.params, given)

    # --- one request --------------------------------------------------------------------

    def _decode(self, data: bytes):
        from cvserve.images.decode import decode

        return decode(data, max_pixels=self.max_pixels, backend="pil")

    async def predict(
        self, data: bytes, trace: Trace, deadline: float, params: dict[str, Any]
    ) -> Prediction:
        with self.admission.admit(deadline):
            # Decoding and the first step on the image share one trip to the pool (a
            # second trip would queue each request behind every other's decoding).
            first = await self.pool.submit(trace, self._decode_first, data, deadline=deadline,
                                           fail_stage="decode")  # fmt: skip
            dec, value, parts = first.value
            if self.options.simulated:
                trace.simulated = True
            req = _Request(dec.image, trace, deadline, uuid.uuid4().hex)
            tasks: dict[str, asyncio.Future] = {}
            if self.first is not None:
                self._record(req, self.first.name, 1, 1, parts)
                tasks[self.first.name] = asyncio.get_running_loop().create_future()
                tasks[self.first.name].set_result(value)
            for s in self.graph.steps:
                if s.name not in tasks:
                    tasks[s.name] = asyncio.ensure_future(self._step(req, s, tasks.get(s.source)))
            try:
                values = {name: await t for name, t in tasks.items()}
            finally:
                for t in tasks.values():  # a failed or cancelled step stops its siblings
                    t.cancel()
                    if t.done() and not t.cancelled():
                        t.exception()  # retrieved: the first failure is what answers
            t0 = time.perf_counter()
            result = join_answer(self.config.answer, self.graph, values)
            trace.add("postprocess", time.perf_counter() - t0)
            trace.advance(time.perf_counter())
            batch = max((self.step_stats[s.name].largest_batch for s in self.graph.steps),
                        default=1)  # fmt: skip
            return Prediction(result=result, batch_size=max(1, batch), image_size=dec.orig_size)

    def _decode_first(self, data: bytes) -> _Timed:
        """Decode, then run ``self.first`` (an in-process step on the image) if any."""
        t0 = time.perf_counter()
        dec = self._decode(data)
        t1 = time.perf_counter()
        stages: dict[str, float] = {"decode": t1 - t0}
        value, parts = None, {}
        s = self.first
        if s is not None and s.kind == "op":
            value, parts = self.impls[s.name].run_image(np.asarray(dec.image))
        elif s is not None:
            model = self.impls[s.name]
            pixels = model.prepare_image(dec.image)
            parts = {"resize": time.perf_counter() - t1}
            answers, st = model.run([pixels], [dec.image.size])
            value = answers[0]
            parts.update(st)
        for k, v in parts.items():
            stages[k] = stages.get(k, 0.0) + v
        return _Timed((dec, value, parts), stages)

    async def _step(self, req: _Request, s: Step, source: asyncio.Future | None) -> Any:
        value = req.image if source is None else await source
        if s.kind == "filter":
            return _per_scope(value, lambda a: filter_detections(s, a))
        if s.kind == "gallery":
            return _per_scope(value, self.impls[s.name].nearest)
        if s.kind == "crop":
            if self.graph.types[s.source] == POLYGONS:
                return crop_polygons(s, value, req.array())
            return crop_boxes(s, value, req.image.size)
        per_crop = self.graph.types.get(s.source, IMAGE) == CROPS
        crops: Crops | None = value if per_crop else None
        if per_crop and not crops.items:
            return []
        if s.kind == "op" and s.target == "ocr_det":
            impl = self.impls[s.name]

            def detect() -> _Timed:
                return _Timed(*impl.run_image(req.array()))

            timed = await self.pool.submit(req.trace, detect, deadline=req.deadline)
            self._record(req, s.name, 1, 1, timed.stages)
            return timed.value
        model = self.impls.get(s.name)

        def prepare() -> tuple[list[np.ndarray], list[tuple[int, int]]]:
            if crops is None:
                return [model.prepare_image(req.image)], [req.image.size]
            size = model.size if isinstance(model, ModelStep) else None
            return ([c.pixels(req.image, size) for c in crops.items],
                    [(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in crops.items])  # fmt: skip

        if s.via == "inprocess" and s.kind == "model":

            def run() -> _Timed:
                t0 = time.perf_counter()
                pixels, sizes = prepare()
                resized = time.perf_counter() - t0
                answers, st = model.run(pixels, sizes)
                st["resize"] = resized
                return _Timed(answers, st)

            timed = await self.pool.submit(req.trace, run, deadline=req.deadline)
            answers, st = timed.value, timed.stages
            n = 1 if crops is None else len(crops.items)
            self._record(req, s.name, n, n, {k: st.get(k, 0.0) for k in ("infer", "postprocess")})
        elif s.via == "inprocess":  # op: ocr_rec, on this request's crops in one call
            impl = self.impls[s.name]

            def read() -> _Timed:
                t0 = time.perf_counter()
                pixels, _ = prepare()
                resized = time.perf_counter() - t0
                out = impl.run_messages(
                    [
                        Message(request_id=req.rid, index=i, arrays={"crop": p})
                        for i, p in enumerate(pixels)
                    ]  # fmt: skip
                )
                st = {"resize": resized, "infer": float(out[0].headers.get(INFER_S, 0.0)),
                      "postprocess": float(out[0].headers.get(POST_S, 0.0))}  # fmt: skip
                return _Timed([{"text": str(r.headers.get("text", "")),
                                "score": float(r.headers.get("score", 0.0))} for r in out], st)  # fmt: skip

            timed = await self.pool.submit(req.trace, read, deadline=req.deadline)
            answers = timed.value
            n = len(answers)
            self._record(req, s.name, n, n, {k: timed.stages[k] for k in ("infer", "postprocess")})
        else:
            # Crops already cut (text regions) are handed over as they are; resizing crops
            # for a model runs beside the pool, not queued behind other requests' decoding
            # (stage A did it in the same trip as the detector)
            t0 = time.perf_counter()
            if isinstance(model, ModelStep):
                pixels, sizes = await asyncio.get_running_loop().run_in_executor(None, prepare)
            else:
                pixels, sizes = prepare()
            req.trace.add("resize", time.perf_counter() - t0)
            answers = await self._over_broker(s, req, pixels, sizes)
        return answers if per_crop else answers[0]

    def _record(
        self, req: _Request, step: str, items: int, batch: int, parts: dict[str, float]
    ) -> None:
        """One call of ``step``: its stats, its share of the trace (every stage it
        spent time in), and ``/metrics`` (infer, postprocess, broker)."""
        req.trace.note_step(step, parts)
        if otel.enabled():
            otel.note(f"cvserve.step.{step}.batch_size", batch)
        parts = {k: parts[k] for k in ("infer", "postprocess", "broker") if k in parts}
        broker = parts.get("broker", 0.0)
        self.step_stats[step].record(items, sum(parts.values()) - broker, batch, broker)
        if self.on_step is not None:
            self.on_step(step, items, batch, parts)

    async def _over_broker(
        self, s: Step, req: _Request, pixels: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> list[Any]:
        """Each item through the broker to ``s``'s workers; their answers in order."""
        trace, deadline = req.trace, req.deadline
        request_id = f"{req.rid}.{s.name}"
        key = "crop" if s.kind == "op" else "pixels"
        wall_deadline = time.time() + max(0.0, deadline - time.perf_counter())
        headers = {DEADLINE: wall_deadline}
        parent = otel.current_traceparent()
        if parent is not None:  # the workers' spans join the request's trace
            headers[otel.TRACEPARENT] = parent
        items = [
            Message(
                request_id=request_id,
                index=i,
                arrays={key: p},
                headers={WIDTH: int(w), HEIGHT: int(h), **headers},
            )  # fmt: skip
            for i, (p, (w, h)) in enumerate(zip(pixels, sizes, strict=True))
        ]
        fut = None
        sent = time.perf_counter()
        try:
            # One round trip for the whole fan-out where the broker can (Redis); the router
            # keeps the items until answered, to publish them again if the broker loses them.
            fut = await self.router.publish(
                work_topic(self.name, s.name), items,
                timeout=max(0.001, deadline - time.perf_counter()),
            )  # fmt: skip
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
                f"pipeline {self.name}: step {s.name} backlog full ({e})", retry_after_s=1
            ) from None
        except ResultTimeout:
            trace.mark("broker")
            raise DeadlineExceeded(
                f"deadline passed waiting for {len(items)} {s.name} results"
            ) from None
        except asyncio.CancelledError:  # the client left, or a sibling step failed
            self.router.forget(request_id)
            raise
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
            raise StageFailed(f"step {s.name} failed: {failed[0].headers[ERROR]}", **detail)
        # The item that came back last bounds the request; charge its worker's own time.
        last = max(deliveries, key=lambda d: d.consumed_at).message.headers
        if any(SIMULATED in r.headers for r in results):
            trace.simulated = True
        infer = float(last.get(INFER_S, 0.0))
        post = float(last.get(POST_S, 0.0))
        broker_s = max(0.0, (done - sent) - infer - post)
        trace.add("broker", broker_s)
        trace.add("infer", infer)
        trace.add("postprocess", post)
        trace.advance(done)
        batch = max(int(r.headers.get(BATCH, 1)) for r in results)
        self._record(req, s.name, len(items), batch,
                     {"infer": infer, "postprocess": post, "broker": broker_s})  # fmt: skip
        if s.kind == "op":  # ocr_rec: text and score
            return [{"text": str(r.headers.get("text", "")),
                     "score": float(r.headers.get("score", 0.0))} for r in results]  # fmt: skip
        return [json.loads(str(r.headers[ANSWER])) for r in results]

    # --- what it is -----------------------------------------------------------------------

    @property
    def task(self) -> str:
        return {"ocr": "ocr", "detect-classify": "detect-classify"}.get(
            self.config.answer, "pipeline"
        )

    @property
    def timeout_ms(self) -> float:
        return self.config.timeout_ms

    def describe(self) -> dict[str, Any]:
        c = self.config
        workers = {w.step.name: w.counts() for w in self.local}
        steps = []
        for row in self.graph.describe():
            name = row["name"]
            row["stats"] = self.step_stats[name].describe()
            if name in workers:
                row["workers_here"] = workers[name]
            if isinstance(self.impls.get(name), ModelStep):
                row["task"] = self.impls[name].meta.task
            steps.append(row)
        return {
            "name": self.name,
            "kind": c.kind,
            "task": self.task,
            "answer": c.answer,
            "ready": self.ready,
            "stages": [s.name for s in self.graph.steps if s.kind in ("model", "op")],
            "steps": steps,
            "topics": {s.name: work_topic(self.name, s.name) for s in self.graph.broker_steps},
            "broker": self.broker.safe_url,  # never the password
            "router": {
                "waiting": self.router.waiting,
                "late": self.router.stats.late,
                "withdrawn": self.router.stats.withdrawn,
            },  # fmt: skip
            "max_deliveries": c.max_deliveries,
            "local_workers": self.local_workers,
            "max_batch_size": c.max_batch_size,
            "max_queue": c.max_queue,
            "timeout_ms": c.timeout_ms,
            "parameters": [],
            "models": {
                n: {"model": i.meta.name, "task": i.meta.task}
                for n, i in self.impls.items()
                if isinstance(i, ModelStep)
            },  # fmt: skip
            # the steps run here (a `cvserve worker` reports its own at start)
            "runtime": describe_runtime(self.options),
            "cpu": self.describe_cpu(),
        }

    def describe_cpu(self) -> dict[str, Any]:
        """How the steps share the CPU here: who runs where with how many threads, and
        (with a budget) what each DNN has used since start."""
        budget = self.options.budget
        split: dict[str, Any] = {
            s.name: {"runs_in": "preprocessing pool", "threads": self.pool.threads}
            if s.via == "inprocess"
            else {"runs_in": "stage B workers", "workers": self.local_workers}
            for s in self.graph.steps
            if s.kind in ("model", "op")
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


def _per_scope(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on a whole-image answer, or on each crop's answer."""
    return [fn(v) for v in value] if isinstance(value, list) else fn(value)
