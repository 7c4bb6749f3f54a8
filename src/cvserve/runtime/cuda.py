"""onnxruntime on an NVIDIA GPU through IO binding, with ``h2d``/``infer``/``d2h`` timed.

:class:`CudaRuntime` is an :class:`~cvserve.runtime.onnx.OrtRuntime` whose session runs
on TensorRT or CUDA (:func:`cvserve.runtime.providers.select_providers`) and whose batches
go in through IO binding: the batcher's host buffer is pinned (page-locked) the first
time it is seen, its rows are copied asynchronously into a preallocated device buffer
(:class:`DeviceBuffers`, one per host buffer), the session reads that buffer in place,
and the outputs come back in one copy. Rows that GPU preprocessing already wrote on the
device (:mod:`cvserve.images.gpu`, marked as :mod:`cvserve.runtime.device_rows` says) are
not copied at all. Each stage is timed with
synchronised timers and reported in :attr:`CudaRuntime.last_stages`, as the simulated
accelerator reports its own, so Server-Timing shows ``h2d``, ``infer`` and ``d2h``.

Not yet run on a GPU: written against the documented CuPy and onnxruntime APIs; only the
parts that need no device (provider choice, errors, row marks) are tested here. CuPy and
onnxruntime-gpu are imported lazily, so the CPU install never needs them.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.runtime.device_rows import new_magic, upload_plan
from cvserve.runtime.onnx import OrtOptions, OrtRuntime, check_input
from cvserve.runtime.providers import DeviceUnavailable, parse_device

log = logging.getLogger(__name__)

__all__ = ["CudaRuntime", "CupyOps", "DeviceBuffers", "import_cupy"]

#: Host buffers kept pinned per model (the batcher reuses a few; more are copied unpinned).
MAX_PINNED = 16


def import_cupy() -> Any:
    """CuPy, or a :class:`DeviceUnavailable` naming the package to install."""
    try:
        import cupy
    except ImportError as e:
        raise DeviceUnavailable(
            f"the GPU path needs CuPy for its device buffers ({e}): pip install 'cvserve[gpu]' "
            "(cupy-cuda13x)"
        ) from None
    return cupy


class CupyOps:
    """Device memory and page-locking through CuPy (onnxruntime's GPU path)."""

    def __init__(self, device_index: int) -> None:
        self.cp = import_cupy()
        self.device_index = device_index

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        with self.cp.cuda.Device(self.device_index):
            return self.cp.empty(shape, dtype=dtype)

    def register(self, ptr: int, nbytes: int) -> None:
        self.cp.cuda.runtime.hostRegister(ptr, nbytes, 0)

    def unregister(self, ptr: int) -> None:
        self.cp.cuda.runtime.hostUnregister(ptr)


class DeviceBuffers:
    """Device twins of the batcher's host batch buffers, shared by a model's instances and
    its GPU preprocessing: ``for_host(buf)`` is the device buffer of host buffer ``buf``
    (allocated, and ``buf`` pinned, the first time). Holds a reference to every host
    buffer it has seen, so no address is reused while registered.

    ``ops`` allocates and pins: CuPy's (:class:`CupyOps`, onnxruntime) or torch's
    (:class:`cvserve.runtime.torchrt.TorchOps`); the bookkeeping is the same for both.
    Not yet run on a GPU."""

    def __init__(
        self, device_index: int, rows: int, item_shape: tuple[int, ...], dtype: str,
        ops: Any = None,
    ) -> None:  # fmt: skip
        self.ops = ops if ops is not None else CupyOps(device_index)
        self.device_index = device_index
        self.rows = rows
        self.item_shape = tuple(item_shape)
        self.dtype = np.dtype(dtype)
        #: Random per process: a mark no client can forge (``cvserve.runtime.device_rows``).
        self.magic = new_magic()
        self._lock = threading.Lock()
        self._by_ptr: dict[int, tuple[np.ndarray, Any, bool]] = {}

    def for_host(self, host: np.ndarray) -> Any:
        ptr = host.__array_interface__["data"][0]
        entry = self._by_ptr.get(ptr)
        if entry is not None and entry[0].nbytes >= host.nbytes:
            return entry[1]
        with self._lock:
            entry = self._by_ptr.get(ptr)
            if entry is None or entry[0].nbytes < host.nbytes:
                dev = self.ops.empty((self.rows, *self.item_shape), self.dtype)
                pinned = self._pin(host) if len(self._by_ptr) < MAX_PINNED else False
                entry = (host, dev, pinned)
                self._by_ptr[ptr] = entry
        return entry[1]

    def row(self, host_buffer: np.ndarray, index: int) -> Any:
        return self.for_host(host_buffer)[index]

    def _pin(self, host: np.ndarray) -> bool:
        """Page-lock ``host`` in place (``cudaHostRegister``), so copies from it are DMA."""
        if not host.flags.c_contiguous:
            return False
        try:
            self.ops.register(host.ctypes.data, host.nbytes)
            return True
        except Exception as e:  # already registered, or not allowed: copy unpinned
            log.debug("could not pin a %d-byte host buffer: %s", host.nbytes, e)
            return False

    def close(self) -> None:
        with self._lock:
            for host, _, pinned in self._by_ptr.values():
                if pinned:
                    try:
                        self.ops.unregister(host.ctypes.data)
                    except Exception:  # the context may be gone at exit
                        pass
            self._by_ptr.clear()


class CudaRuntime(OrtRuntime):
    """One GPU session (one model instance) fed through IO binding. Not yet run on a GPU."""

    def __init__(
        self,
        path: str | Path,
        options: OrtOptions,
        buffers: DeviceBuffers | None = None,
        *,
        max_batch: int = 1,
    ) -> None:
        device = parse_device(options.device)
        if not device.is_gpu:
            raise ValueError(f"CudaRuntime needs a cuda device, got {device}")
        super().__init__(path, options)  # a GPU session, or DeviceUnavailable
        self.device = device
        self.cp = import_cupy()
        shape = tuple(int(d) for d in self.input_shape[1:] if isinstance(d, int))
        if len(shape) != len(self.input_shape) - 1:
            raise ValueError(
                f"{path}: the GPU path needs a fixed input row, got {self.input_shape}"
            )
        self.buffers = buffers or DeviceBuffers(device.index, max_batch, shape, self.input_dtype)
        with self.cp.cuda.Device(device.index):
            self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.last_stages: dict[str, float] | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "onnxruntime", "simulated": False, "device": str(self.device),
                "providers": list(self.providers), "io_binding": True}  # fmt: skip

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.last_stages = None
        check_input(batch, self.input_dtype, self.input_shape)
        n = int(batch.shape[0])
        host = batch.base if isinstance(batch.base, np.ndarray) else batch
        if host.__array_interface__["data"][0] != batch.__array_interface__["data"][0]:
            host = batch  # not the start of a batcher buffer: treat the view as its own
        cp = self.cp
        with cp.cuda.Device(self.device.index):
            t0 = time.perf_counter()
            dev = self._upload(batch, host, n)
            self.stream.synchronize()
            t1 = time.perf_counter()
            io = self.session.io_binding()
            io.bind_input(
                name=self.input_name,
                device_type="cuda",
                device_id=self.device.index,
                element_type=np.dtype(self.input_dtype),
                shape=tuple(batch.shape),
                buffer_ptr=dev.data.ptr,
            )
            for name in self.output_names:
                io.bind_output(name, "cuda", self.device.index)
            self.session.run_with_iobinding(io)  # returns once the outputs are ready
            t2 = time.perf_counter()
            outputs = io.copy_outputs_to_cpu()
            t3 = time.perf_counter()
        self.last_stages = {"h2d": t1 - t0, "infer": t2 - t1, "d2h": t3 - t2}
        return outputs

    def _upload(self, batch: np.ndarray, host: np.ndarray, n: int):
        """The device buffer holding the batch: host rows copied in (contiguous runs, one
        async copy each), device rows moved to where the batcher squeezed their host rows."""
        buffers = self.buffers
        if host.shape[0] > buffers.rows:  # warm-up or a direct caller: a buffer of its own
            dev = self.cp.empty(host.shape, dtype=host.dtype)
        else:
            dev = buffers.for_host(host)
        with self.stream:
            for op, a, b in upload_plan(batch, buffers.magic):
                if op == "host":
                    dev[a:b].set(batch[a:b], stream=self.stream)
                else:
                    dev[a][...] = dev[b]
        return dev[:n]
