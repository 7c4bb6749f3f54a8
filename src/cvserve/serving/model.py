"""One served model: admission, preprocessing into batch slots, batching, task head.

Every request that :meth:`ModelServer.predict` admits ends in exactly one result or one
typed error; nothing a request does can fail another request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from cvserve.config import ModelConfig
from cvserve.errors import RequestError
from cvserve.images.preprocess import Preprocessor
from cvserve.models.metadata import ModelMeta
from cvserve.runtime.onnx import OrtOptions, OrtRuntime
from cvserve.runtime.simulated import SimDevice, SimModel, SimulatedRuntime
from cvserve.serving.batcher import Batcher, BatchInfo
from cvserve.tasks.base import get_head
from cvserve.trace import Trace

log = logging.getLogger(__name__)


class ServingError(RequestError):
    """Base of the errors the server itself answers with (admission, deadlines)."""


class Overloaded(ServingError):
    status = 429
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int, **detail: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **detail)
        self.retry_after_s = retry_after_s


class Draining(ServingError):
    status = 503
    kind = "draining"


class DeadlineExceeded(ServingError):
    status = 504
    kind = "deadline_exceeded"


@dataclass
class Prediction:
    """A finished request: the task head's result and how it was batched."""

    result: dict
    batch_size: int
    image_size: tuple[int, int]


class PreprocessPool:
    """The threads that decode, resize and normalize, shared by every model of a server.

    Pillow and numpy release the GIL in the pixel loops, so these threads really run in
    parallel. The semaphore makes the wait for a free thread visible (the ``queue`` stage)
    and lets a request give up at its deadline while still waiting.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="preprocess")
        self._sem: asyncio.Semaphore | None = None

    @property
    def semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.threads)
        return self._sem

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=False)

    async def run(self, trace: Trace, stage: str, fn, *args):
        """``fn(*args)`` on a pool thread: the wait for a free thread is charged to
        ``queue`` and the work itself to ``stage``, so a busy pool shows as queueing."""

        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            return out, t0, time.perf_counter()

        out, t0, t1 = await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        trace.add("queue", t0 - trace.last)
        trace.add(stage, t1 - t0)
        trace.advance(t1)
        return out


class ModelServer:
    """Serves one model: admission control, preprocessing, batching and postprocessing."""

    def __init__(
        self,
        meta: ModelMeta,
        onnx_path: str,
        config: ModelConfig,
        pool: PreprocessPool,
        *,
        max_pixels: int,
        on_batch=None,
    ) -> None:
        self.name = config.name
        self.meta = meta
        self.config = config
        self.pool = pool
        spec = (
            meta.preprocess.replace(**config.preprocess) if config.preprocess else meta.preprocess
        )
        if meta.input_dtype == "uint8" and spec.dtype != "uint8":
            spec = spec.replace(dtype="uint8")
        self.spec = spec
        self.preprocessor = Preprocessor(spec, decoder=config.decoder, max_pixels=max_pixels)
        self.head = get_head(meta)
        b = config.batching
        runtimes = _make_runtimes(onnx_path, config)
        shape = runtimes[0].input_shape
        if len(shape) != len(spec.input_shape) + 1 or any(
            isinstance(d, int) and d != s for d, s in zip(shape[1:], spec.input_shape, strict=True)
        ):
            raise ValueError(
                f"model {self.name}: preprocessing makes {list(spec.input_shape)}, "
                f"the ONNX input is {shape}"
            )
        self.batcher = Batcher(
            runtimes, spec.input_shape, spec.dtype, b, name=self.name, on_batch=on_batch
        )
        self._runtimes = runtimes
        self.inflight = 0
        self._ewma_latency = 0.05  # seconds per request, for Retry-After
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------
    def warm_up(self) -> None:
        """One full batch through every instance, so the first request pays nothing extra."""
        x = np.zeros((self.config.batching.max_batch_size, *self.spec.input_shape), self.spec.dtype)
        for rt in self._runtimes:
            rt.run(x)
            rt.run(x[:1])

    def start(self) -> None:
        self.batcher.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self.batcher.stop()

    # -- requests ------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        return max(
            1, math.ceil(self.inflight * self._ewma_latency / self.config.batching.instances)
        )

    async def predict(
        self, data: bytes, trace: Trace, deadline: float, params: dict[str, Any]
    ) -> Prediction:
        """Run one image through the model. ``deadline`` is a perf_counter time."""
        cfg = self.config.batching
        if self.inflight >= cfg.max_queue:
            raise Overloaded(
                f"model {self.name} has {self.inflight} requests in flight (max_queue="
                f"{cfg.max_queue}); retry later",
                retry_after_s=self.retry_after_s(),
                max_queue=cfg.max_queue,
            )
        self.inflight += 1
        t_admit = time.perf_counter()
        try:
            return await self._predict(data, trace, deadline, params)
        finally:
            self.inflight -= 1
            self._ewma_latency += 0.1 * ((time.perf_counter() - t_admit) - self._ewma_latency)

    async def _predict(self, data, trace: Trace, deadline: float, params) -> Prediction:
        batcher = self.batcher
        batcher.upstream += 1
        try:
            meta, slot = await self._preprocess(data, trace, deadline)
        except BaseException:
            batcher.upstream -= 1
            batcher.poke()  # the batch it might have joined need not wait for it
            raise
        batcher.upstream -= 1
        fut = batcher.commit(slot)
        try:
            rows, info = await asyncio.wait_for(fut, _remaining(deadline))
        except TimeoutError:
            trace.mark("batch_wait")
            raise DeadlineExceeded("deadline passed while waiting for inference") from None
        info: BatchInfo
        _charge_batch(trace, info)
        if self.meta.task == "classify":  # microseconds: not worth a thread hop
            result = self.head.postprocess(rows, meta, **params)
        else:  # full-resolution masks and depth maps take real CPU: off the event loop
            result = await self.pool.run(
                trace, "postprocess", partial(self.head.postprocess, rows, meta, **params)
            )
        trace.mark("postprocess")
        return Prediction(result=result, batch_size=info.size, image_size=meta.orig_size)

    async def _preprocess(self, data, trace: Trace, deadline: float):
        """Wait for a preprocessing thread, then decode into a reserved batch slot."""
        loop = asyncio.get_running_loop()
        sem = self.pool.semaphore
        try:
            await asyncio.wait_for(sem.acquire(), _remaining(deadline))
        except TimeoutError:
            trace.mark("queue")
            raise DeadlineExceeded(
                "deadline passed while waiting for a preprocessing worker"
            ) from None
        slot = self.batcher.reserve()
        # Preprocessing is never abandoned halfway: the thread writes into the slot, so
        # the slot is settled (commit or release) only once the thread is done with it.
        work = loop.run_in_executor(self.pool.executor, self.preprocessor.run, data, slot.view)
        try:
            meta = await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda _: self._settle_abandoned(slot))
            raise
        except BaseException:
            self.batcher.release(slot)
            sem.release()
            trace.mark("decode")  # the image failed in preprocessing, almost always decoding
            raise
        sem.release()
        trace.add("queue", meta.started - trace.last)
        for stage, seconds in meta.stages.items():
            trace.add(stage, seconds)
        trace.advance(meta.finished)
        return meta, slot

    @property
    def task(self) -> str:
        return self.meta.task

    @property
    def timeout_ms(self) -> float:
        return self.config.batching.timeout_ms

    def _settle_abandoned(self, slot) -> None:
        self.batcher.release(slot)
        self.pool.semaphore.release()

    def describe(self) -> dict[str, Any]:
        m = self.meta
        b = self.config.batching
        return {
            "name": self.name,
            "model": m.name,
            "task": m.task,
            "ready": self.ready,
            "input": {"name": m.input_name, "shape": m.input_shape, "dtype": self.spec.dtype},
            "outputs": m.output_names,
            "preprocess": self.spec.to_dict(),
            "decoder": self.config.decoder,
            "labels": len(m.labels),
            "params": m.params,
            "source": m.source,
            "batching": {
                "max_batch_size": b.max_batch_size,
                "max_delay_ms": b.max_delay_ms,
                "instances": b.instances,
                "max_queue": b.max_queue,
                "timeout_ms": b.timeout_ms,
            },
            "runtime": self.runtime_description(),
        }

    def runtime_description(self) -> dict[str, Any]:
        rt = self._runtimes[0]
        if isinstance(rt, SimulatedRuntime):
            return rt.describe()
        return {"kind": "onnxruntime", "simulated": False, "providers": list(rt.providers)}


def _make_runtimes(onnx_path: str, config: ModelConfig) -> list:
    """One runtime per instance: onnxruntime sessions, or simulated runtimes sharing one
    simulated device (``sim_devices`` slots) and one view of the model's outputs."""
    n = config.batching.instances
    if config.runtime == "simulated":
        device = SimDevice(config.sim_profile, config.sim_devices, config.sim_h2d_gbps)
        model = SimModel(onnx_path)
        log.info(
            "%s: simulated accelerator (%d device(s), profile: %s)",
            config.name,
            config.sim_devices,
            device.profile.source,
        )
        return [SimulatedRuntime(onnx_path, device, model=model) for _ in range(n)]
    threads = config.intra_op_threads or max(1, (os.cpu_count() or 1) // n)
    return [OrtRuntime(onnx_path, OrtOptions(intra_op_threads=threads)) for _ in range(n)]


def _charge_batch(trace: Trace, info: BatchInfo) -> None:
    """Charge a row's wait and its batch's runtime call to the trace. When the runtime
    split its call (the simulated accelerator), waiting for a device counts as
    ``batch_wait`` and the copies as ``h2d``/``d2h``; ``infer`` gets the rest of the call,
    so the stages still add up to the request's time."""
    split = info.stages or {}
    call = info.infer_end - info.infer_start
    trace.add("batch_wait", info.infer_start - trace.last + split.get("batch_wait", 0.0))
    if "h2d" in split:
        trace.add("h2d", split["h2d"])
    trace.add("infer", call - sum(split.get(k, 0.0) for k in ("batch_wait", "h2d", "d2h")))
    if "d2h" in split:
        trace.add("d2h", split["d2h"])
    trace.advance(info.infer_end)
    if info.simulated:
        trace.simulated = True


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.perf_counter())
