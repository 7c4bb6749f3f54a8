"""One served model: admission, preprocessing into batch slots, batching, task head.

Every request that :meth:`ModelServer.predict` admits ends in exactly one result or one
typed error; nothing a request does can fail another request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cvserve import otel
from cvserve.config import ModelConfig
from cvserve.images.preprocess import ImageMeta, Preprocessor
from cvserve.models.metadata import ModelMeta
from cvserve.runtime.factory import open_runtimes
from cvserve.runtime.onnx import OrtOptions
from cvserve.runtime.simulated import SimDevice, SimulatedRuntime
from cvserve.serving.batcher import Batcher, BatchInfo, Slot
from cvserve.serving.core import (
    AUTO_WAIT_ROUNDS,
    CPU_WAIT_ROUNDS,
    Admission,
    Prediction,
    PreprocessPool,
    remaining,
)
from cvserve.serving.errors import BadRequest, DeadlineExceeded, NotServed
from cvserve.serving.stats import ModelStats
from cvserve.tasks.base import get_head, head_spec
from cvserve.tasks.params import describe_params, parse_params
from cvserve.trace import Trace

log = logging.getLogger(__name__)


@dataclass
class _Filled:
    """A batch slot with a preprocessed image in it."""

    slot: Slot
    meta: ImageMeta

    @property
    def stages(self) -> dict[str, float]:
        return self.meta.stages


class ModelServer:
    """Serves one model (a :class:`~cvserve.serving.core.Servable`): admission,
    preprocessing, batching and the task head."""

    def __init__(
        self,
        meta: ModelMeta,
        onnx_path: str,
        config: ModelConfig,
        pool: PreprocessPool,
        *,
        max_pixels: int,
        on_batch=None,
        version: int = 1,
    ) -> None:
        self.name = config.name
        #: The store version this server runs (v2: ``/versions/{v}``; /v1: ``name@v``).
        self.version = str(version)
        #: Set when a newer version replaced this one (``serving.control``): a request
        #: that found this server but was not admitted yet goes there instead.
        self.successor: ModelServer | None = None
        #: Set when unloaded: a request not admitted yet is refused (404).
        self.retired = False
        self.onnx_path = onnx_path
        #: Resident memory the runtimes took to open and warm up (an estimate: the
        #: process's growth meanwhile), set by whoever measured it.
        self.runtime_bytes: int | None = None
        self.meta = meta
        self.config = config
        self.pool = pool
        # the model's preprocessing, a head's own, then the config's overrides
        self.head = get_head(meta, config.head)
        self.heavy = self.head.heavy
        spec = head_spec(self.head, meta.preprocess)
        spec = spec.replace(**config.preprocess) if config.preprocess else spec
        if meta.input_dtype == "uint8" and spec.dtype != "uint8":
            spec = spec.replace(dtype="uint8")
        self.spec = spec
        self.preprocessor = Preprocessor(spec, decoder=config.decoder, max_pixels=max_pixels)
        b = config.batching
        runtimes = _make_runtimes(_graph_file(meta, onnx_path, config), config, meta)
        #: ``--preprocess gpu|auto``: JPEGs decoded and resized on the device (per image).
        self.gpu_preprocessor = _make_gpu_preprocessor(config, spec, self.preprocessor,
                                                       runtimes, pool)  # fmt: skip
        shape = runtimes[0].input_shape
        if len(shape) != len(spec.input_shape) + 1 or any(
            isinstance(d, int) and d != s for d, s in zip(shape[1:], spec.input_shape, strict=True)
        ):
            raise ValueError(
                f"model {self.name}: preprocessing makes {list(spec.input_shape)}, "
                f"the ONNX input is {shape}"
            )
        if isinstance(shape[0], int) and shape[0] < b.max_batch_size:
            # A fixed batch axis (Ultralytics exports batch 1 by default): batches that big.
            log.info("model %s: its ONNX batch axis is fixed at %d; max_batch_size %d -> %d",
                     self.name, shape[0], b.max_batch_size, shape[0])  # fmt: skip
            b = dataclasses.replace(b, max_batch_size=shape[0])
            self.config = config = dataclasses.replace(config, batching=b)
        self.stats = ModelStats(self.name, self.version)

        def observe(info: BatchInfo) -> None:
            self.stats.observe_batch(info.size, info.infer_end - info.infer_start)
            self.admission.observe_batch(info.size, info.infer_end - info.infer_start,
                                         info.infer_end)  # fmt: skip
            if on_batch is not None:
                on_batch(info)

        self.batcher = Batcher(
            runtimes, spec.input_shape, spec.dtype, b, name=self.name, on_batch=observe
        )
        self._runtimes = runtimes
        self.admission = Admission(
            f"model {self.name}", b.max_queue, b.instances,
            max_wait_s=None if b.max_queue_wait_ms is None else b.max_queue_wait_ms / 1000.0,
            round_rows=b.max_batch_size * b.instances,
            rounds=CPU_WAIT_ROUNDS if on_cpu(config) else AUTO_WAIT_ROUNDS,
        )  # fmt: skip
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------
    #: Whether :meth:`warm_up` has run, and how long it took (s).
    warmed = False
    warm_up_s: float | None = None

    def warm_up(self, pace: float = 0.0) -> None:
        """Every batch size the batcher will run (1 to ``max_batch_size``) through every
        instance, so that no request pays for a first run of its size (onnxruntime's
        allocations and, on a GPU, kernel selection per shape). ``pace``: after each run,
        rest ``pace`` times as long as it took (a load beside served models leaves them
        most of the cores: 1.0 takes at most half of what its threads could)."""
        t0 = time.perf_counter()
        x = np.zeros((self.config.batching.max_batch_size, *self.spec.input_shape), self.spec.dtype)
        for rt in self._runtimes:
            for n in range(len(x), 0, -1):
                t1 = time.perf_counter()
                rt.run(x[:n])
                if pace > 0:
                    time.sleep((time.perf_counter() - t1) * pace)
        self.warm_up_s = time.perf_counter() - t0

    async def start(self) -> None:
        if not self.warmed:  # else warmed where it was opened (serving.loading)
            await asyncio.get_running_loop().run_in_executor(None, self.warm_up)
            log.info("%s version %s: warmed up (batch sizes 1-%d) in %.2f s", self.name,
                     self.version, self.config.batching.max_batch_size, self.warm_up_s)  # fmt: skip
            self.warmed = True
        self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.batcher.stop()

    def release(self) -> None:
        """Drop the runtimes (after :meth:`stop`), so their memory goes with the last
        reference to them."""
        self._runtimes = []
        self.gpu_preprocessor = None
        self.batcher.drop()

    def memory(self) -> dict[str, int | None]:
        """What this model holds, in bytes: its weights file (once per instance), the
        runtime's arena as measured when it opened (an estimate), the batch buffers."""
        try:
            weights = os.path.getsize(self.onnx_path)
        except OSError:
            weights = 0
        return {
            "weights_bytes": weights * self.config.batching.instances,
            "runtime_bytes": self.runtime_bytes,
            "batch_buffer_bytes": self.batcher.buffer_bytes,
        }

    # -- requests ------------------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def parse_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return parse_params(self.head.params, given)

    async def predict(
        self, data: bytes | np.ndarray, trace: Trace, deadline: float, params: dict[str, Any]
    ) -> Prediction:
        """Run one image through the model. ``deadline`` is a perf_counter time.

        ``data`` is the encoded image, or one row of the model's own input (an ndarray of
        ``input_shape`` and ``input_dtype``), which skips preprocessing."""
        if self.successor is not None:  # replaced since this request found it
            return await self.successor.predict(data, trace, deadline, params)
        if self.retired:
            raise NotServed(f"model {self.name!r} version {self.version} was unloaded")
        fill = self._fill
        if isinstance(data, np.ndarray):
            self.check_tensor(data)
            fill = self._fill_tensor
        with self.admission.admit(deadline):
            with self.batcher.incoming():
                filled = await self.pool.submit(
                    trace,
                    fill,
                    data,
                    deadline=deadline,
                    claim=self.batcher.reserve,
                    release=self.batcher.release,
                    fail_stage="decode",  # an image that fails here almost always fails decoding
                )
                fut = self.batcher.commit(filled.slot)
            try:
                rows, info = await asyncio.wait_for(fut, remaining(deadline))
            except TimeoutError:
                trace.mark("batch_wait")
                raise DeadlineExceeded("deadline passed while waiting for inference") from None
            charge_batch(trace, info)
            otel.note("cvserve.batch_size", info.size)  # the batch it rode in (its trace)
            post = partial(self.head.postprocess, rows, filled.meta, **params)
            if self.heavy:  # full-resolution masks and depth maps: off the event loop
                result = await self.pool.submit(trace, post, deadline=deadline, stage="postprocess")
            else:
                result = post()
                trace.mark("postprocess")
            return Prediction(
                result=result,
                batch_size=info.size,
                image_size=filled.meta.orig_size,
                outputs=rows,
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One row of the model's input (no batch axis), as preprocessing makes it."""
        return tuple(self.spec.input_shape)

    @property
    def input_dtype(self) -> str:
        return self.spec.dtype

    @property
    def output_names(self) -> list[str]:
        return list(self._runtimes[0].output_names)

    def output_signature(self) -> list[tuple[str, str, tuple]]:
        """(name, numpy dtype, row shape with -1 for open dimensions) of each raw output."""
        return self._runtimes[0].output_signature(self.input_shape)

    def check_tensor(self, row: np.ndarray) -> None:
        """A preprocessed input row must be exactly what the model takes (400 otherwise)."""
        if str(row.dtype) != self.input_dtype or tuple(row.shape) != self.input_shape:
            raise BadRequest(
                f"model {self.name} takes one input row of shape {list(self.input_shape)} "
                f"and dtype {self.input_dtype}; got shape {list(row.shape)}, dtype {row.dtype}",
                expected_shape=list(self.input_shape),
                expected_dtype=self.input_dtype,
            )

    def _fill(self, slot: Slot, data: bytes) -> _Filled:
        if self.gpu_preprocessor is not None:
            return _Filled(slot, self.gpu_preprocessor.run(data, slot.batch.buf, slot.index))
        return _Filled(slot, self.preprocessor.run(data, slot.view))

    def _fill_tensor(self, slot: Slot, row: np.ndarray) -> _Filled:
        t0 = time.perf_counter()
        slot.view[...] = row
        t1 = time.perf_counter()
        h, w = (self.spec.height, self.spec.width)
        meta = ImageMeta(orig_size=(w, h), format="tensor", reduced=1,
                         stages={"normalize": t1 - t0}, started=t0, finished=t1)  # fmt: skip
        return _Filled(slot, meta)

    @property
    def task(self) -> str:
        return self.head.task if self.config.head else self.meta.task

    @property
    def timeout_ms(self) -> float:
        return self.config.batching.timeout_ms

    def describe(self) -> dict[str, Any]:
        m = self.meta
        b = self.config.batching
        return {
            "name": self.name,
            "version": self.version,
            "model": m.name,
            "task": self.task,
            **({"head": self.config.head} if self.config.head else {}),
            "ready": self.ready,
            "input": {"name": m.input_name, "shape": m.input_shape, "dtype": self.spec.dtype},
            "outputs": m.output_names,
            "preprocess": self.spec.to_dict(),
            "decoder": self.config.decoder,
            "labels": len(m.labels),
            "parameters": describe_params(self.head.params),
            "params": m.params,
            "source": m.source,
            "weights": m.weights,
            "batching": {
                "max_batch_size": b.max_batch_size,
                "max_delay_ms": b.max_delay_ms,
                "instances": b.instances,
                "max_queue": b.max_queue,
                "timeout_ms": b.timeout_ms,
            },
            "admission": self.admission.describe(),
            "runtime": self.runtime_description(),
            "memory": self.memory(),
        }

    def runtime_description(self) -> dict[str, Any]:
        rt = self._runtimes[0]
        if isinstance(rt, SimulatedRuntime) or hasattr(rt, "describe"):
            out = rt.describe()
        else:
            out = {"kind": "onnxruntime", "simulated": False, "providers": list(rt.providers)}
        if self.gpu_preprocessor is not None:
            out["preprocess"] = self.gpu_preprocessor.describe()
        return out


def on_cpu(config: ModelConfig) -> bool:
    """Whether the model's DNN runs on the host's CPU (not a GPU, not the simulated device)."""
    return config.runtime != "simulated" and config.device == "cpu"


def _graph_file(meta: ModelMeta, onnx_path: str, config: ModelConfig) -> str:
    """The file the configured runtime serves: the ``.pt2`` beside the ONNX file for
    ``--runtime torch`` (:func:`cvserve.models.pt2.graph_path`), else the ONNX file."""
    from cvserve.models.pt2 import graph_path

    return str(graph_path(meta, Path(onnx_path).parent, config.runtime)) if (
        config.runtime == "torch" or onnx_path.endswith(".pt2")
    ) else onnx_path  # fmt: skip


def _make_runtimes(onnx_path: str, config: ModelConfig, meta: ModelMeta | None = None) -> list:
    """One runtime per instance (:func:`cvserve.runtime.open_runtimes`): onnxruntime
    sessions on the CPU or a GPU, torch runtimes of a ``.pt2``, or simulated runtimes
    sharing one simulated device (``sim_devices`` slots)."""
    n = config.batching.instances
    if config.runtime == "torch":
        from cvserve.runtime.torchrt import TorchOptions

        options = TorchOptions(
            device=config.device,
            threads=config.intra_op_threads or max(1, (os.cpu_count() or 1) // n),
            compile=config.torch_compile, channels_last=config.channels_last,
            precision=config.precision, cuda_graphs=config.cuda_graphs,
        )  # fmt: skip
        return open_runtimes(onnx_path, n, torch_options=options,
                             max_batch=config.batching.max_batch_size,
                             output_names=meta.output_names if meta else None)  # fmt: skip
    if config.runtime == "simulated":
        device = SimDevice(config.sim_profile, config.sim_devices, config.sim_h2d_gbps)
        log.info(  # the profile's source is long: GET /v1/models/NAME has it
            "%s: simulated accelerator, %d device(s), %s",
            config.name,
            config.sim_devices,
            device.profile.summary(),
        )
        return open_runtimes(onnx_path, n, sim_device=device)
    if config.device != "cpu":
        # Fails at start-up (DeviceUnavailable) when no GPU provider can run: never a CPU
        # session. TensorRT's caches live beside the model unless configured.
        trt_cache = config.trt_cache or str(Path(onnx_path).parent / "trt")
        options = OrtOptions(intra_op_threads=config.intra_op_threads or 1, device=config.device,
                             gpu_provider=config.gpu_provider, fp16=config.fp16,
                             trt_cache=trt_cache)  # fmt: skip
        return open_runtimes(onnx_path, n, options=options,
                             max_batch=config.batching.max_batch_size)  # fmt: skip
    threads = config.intra_op_threads or max(1, (os.cpu_count() or 1) // n)
    return open_runtimes(onnx_path, n, options=OrtOptions(intra_op_threads=threads))


def _make_gpu_preprocessor(config: ModelConfig, spec, cpu: Preprocessor, runtimes, pool):
    """``--preprocess gpu|auto``: a GpuPreprocessor writing into the runtimes' device
    buffers; None for ``cpu``."""
    if config.preprocess_device == "cpu":
        return None
    from cvserve.images.gpu import AutoPolicy, GpuPreprocessor, NvImageCodecBackend

    rt = runtimes[0]
    if config.runtime == "torch":  # torchvision's nvJPEG, into the torch runtime's buffers
        from cvserve.images.gpu_torch import TorchvisionBackend

        backend = TorchvisionBackend(rt.buffers, rt.device.index)
    else:
        backend = NvImageCodecBackend(rt.buffers, rt.device.index)
    mode = config.preprocess_device
    policy = AutoPolicy(cpu_threads=getattr(pool, "threads", 1)) if mode == "auto" else None
    return GpuPreprocessor(spec, backend, cpu, mode=mode, policy=policy)


def charge_batch(trace: Trace, info: BatchInfo) -> None:
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
