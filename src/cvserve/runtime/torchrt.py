"""PyTorch as a runtime: a ``torch.export`` program (``.pt2``) on the CPU or an NVIDIA GPU.

:class:`TorchRuntime` speaks the runtime protocol (``inputs``, ``outputs``, ``run``) of
:mod:`cvserve.runtime.onnx`. It loads an ``ExportedProgram`` saved with
``torch.export.save`` (one image input; its batch dimension dynamic, or fixed: then every
batch is cut into, and padded to, that size) and runs it

* on the CPU: the batcher's buffer is read in place (``torch.from_numpy``), no copy;
* on ``cuda[:N]``: host rows are copied from pinned (page-locked) batcher buffers into
  device buffers on a side stream (:class:`~cvserve.runtime.cuda.DeviceBuffers`, shared
  with onnxruntime's GPU path and with GPU preprocessing, whose rows are not copied at
  all: :func:`~cvserve.runtime.device_rows.upload_plan`), the program runs on the compute
  stream once the copy's event fires, and the outputs come back on the side stream into
  pinned host tensors. ``h2d`` / ``infer`` / ``d2h`` are timed apart with CUDA events
  and reported in :attr:`TorchRuntime.last_stages` (Server-Timing).

Options (:class:`TorchOptions`): ``torch.compile``, channels-last memory format, FP16/BF16
autocast (GPU), and CUDA graphs: one graph captured per batch size bucket (powers of two up
to ``max_batch``), a batch padded to its bucket and replayed.

torch is imported here only when a torch runtime is made: serving an ONNX model never
imports it. The GPU branches are written against PyTorch's documented CUDA APIs and have
not yet run on a GPU; everything else is tested on the CPU.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.runtime.device_rows import upload_plan
from cvserve.runtime.onnx import check_input
from cvserve.runtime.providers import Device, DeviceUnavailable, parse_device

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "TorchOps", "TorchOptions", "TorchRuntime", "import_torch"]

#: ``--precision``: autocast dtypes on a GPU (``fp32``: none).
PRECISIONS = ("fp32", "fp16", "bf16")
_TORCH_HINT = "pip install 'cvserve[torch]'"


def import_torch() -> Any:
    """torch, or a :class:`DeviceUnavailable` naming the extra to install.

    Its OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), as
    onnxruntime's do here (``allow_spinning=False``): spinning threads burn the cores
    preprocessing needs, and on a busy machine each parallel region then waits for a
    descheduled spinner (resnet50 at batch 1 took 17 s instead of 0.4 s on 2 shared cores).
    The setting is read when torch loads, so a process that imported torch earlier keeps
    its own."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as e:
        raise DeviceUnavailable(f"--runtime torch needs PyTorch ({e}): {_TORCH_HINT}") from None
    return torch


@dataclass(frozen=True)
class TorchOptions:
    """How a ``.pt2`` program runs."""

    #: ``cpu`` or ``cuda[:N]`` (never a silent CPU fallback).
    device: str = "cpu"
    #: torch's intra-op threads on the CPU (process-wide in torch); 0 leaves torch's own.
    threads: int = 0
    #: ``torch.compile`` the program (Inductor; the first batch of each size compiles).
    compile: bool = False
    #: channels-last (NHWC) memory format for weights and inputs of rank 4.
    channels_last: bool = False
    #: ``fp32``, or autocast to ``fp16`` / ``bf16`` on a GPU.
    precision: str = "fp32"
    #: On a GPU: capture one CUDA graph per batch size bucket and replay it.
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        dev = parse_device(self.device)
        if not dev.is_gpu and (self.precision != "fp32" or self.cuda_graphs):
            raise ValueError("--precision fp16/bf16 and --cuda-graphs need --device cuda[:N]")


class TorchOps:
    """:class:`~cvserve.runtime.cuda.DeviceBuffers`' allocation and pinning through torch
    (no CuPy needed). Not yet run on a GPU."""

    def __init__(self, torch: Any, device_index: int) -> None:
        self.torch = torch
        self.device = torch.device("cuda", device_index)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        return self.torch.empty(shape, dtype=_torch_dtype(self.torch, dtype), device=self.device)

    def register(self, ptr: int, nbytes: int) -> None:
        err = self.torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(getattr(err, "value", err)) != 0:
            raise RuntimeError(f"cudaHostRegister: error {err}")

    def unregister(self, ptr: int) -> None:
        self.torch.cuda.cudart().cudaHostUnregister(ptr)


def _torch_dtype(torch: Any, dtype: Any) -> Any:
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype


class _Program:
    """A loaded ``.pt2``: what every instance of one model shares (the module, its
    signature, and on a GPU the device buffers)."""

    def __init__(self, torch: Any, path: str | Path, options: TorchOptions, device: Device):
        try:
            ep = torch.export.load(str(path))
        except Exception as e:  # a corrupt or foreign file: one line, not a traceback
            raise ValueError(f"{path}: not a torch.export program torch can load: {e}") from e
        inputs, outputs = program_signature(ep)
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one image input, found {len(inputs)}")
        self.input_name, self.input_shape, self.input_dtype = inputs[0]
        self.outputs = outputs
        #: The batch size baked into the graph, or None when it is dynamic.
        self.fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        module = ep.module()
        target = torch.device("cuda", device.index) if device.is_gpu else torch.device("cpu")
        module = module.to(target)
        if options.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if options.compile:
            dynamic = self.fixed_batch is None and not options.cuda_graphs
            module = torch.compile(module, dynamic=dynamic)
        self.module = module
        self.device = target


def program_signature(ep: Any) -> tuple[list[tuple], list[tuple]]:
    """``([(name, shape, dtype)] of the user inputs, [(name, shape, dtype)] of the
    outputs)`` of an ExportedProgram; a dimension left dynamic is None, dtypes are NumPy's."""
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    values = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = [(name, *_shape_dtype(values.get(name))) for name in user_inputs]
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    flat = out_node.args[0] if isinstance(out_node.args[0], list | tuple) else [out_node.args[0]]
    names = list(sig.user_outputs)
    outputs = []
    for i, node in enumerate(flat[-len(names) :] if names else flat):
        val = node.meta.get("val") if hasattr(node, "meta") else None
        outputs.append((names[i] if i < len(names) else f"output{i}", *_shape_dtype(val)))
    return inputs, outputs


def _shape_dtype(val: Any) -> tuple[list, str]:
    if val is None or not hasattr(val, "shape"):
        return [], "float32"
    shape = [int(d) if _is_static(d) else None for d in val.shape]
    dtype = str(val.dtype).removeprefix("torch.")
    return shape, {"float": "float32", "half": "float16"}.get(dtype, dtype)


def _is_static(d: Any) -> bool:
    try:
        int(d)
    except Exception:  # a SymInt without a value
        return False
    return type(d) is int


class TorchRuntime:
    """One instance of a ``.pt2`` model (shares its :class:`_Program` with the model's
    other instances; each instance has its own streams and CUDA graphs)."""

    def __init__(
        self,
        path: str | Path,
        options: TorchOptions | None = None,
        *,
        shared: TorchRuntime | None = None,
        max_batch: int = 1,
        output_names: list[str] | None = None,
    ) -> None:
        self.options = options = options or TorchOptions()
        self.torch = torch = import_torch()
        self.device = parse_device(options.device)
        if self.device.is_gpu:
            _check_cuda(torch, self.device)
        if options.threads and not self.device.is_gpu:
            torch.set_num_threads(options.threads)
        self.program = (
            shared.program if shared is not None else _Program(torch, path, options, self.device)
        )
        p = self.program
        self.path = str(path)
        self.input_name = p.input_name
        self.input_shape = list(p.input_shape)
        self.input_dtype = p.input_dtype
        names = [o[0] for o in p.outputs]
        self.output_names = (
            list(output_names) if output_names and len(output_names) == len(names) else names
        )
        self.max_batch = max(1, max_batch)
        self.last_stages: dict[str, float] | None = None
        self.buffers = None
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._lock = threading.Lock()
        if self.device.is_gpu:
            self._init_gpu(shared)

    # -- the protocol ------------------------------------------------------------------------
    def output_signature(self, item_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
        return [
            (name, dtype if self.options.precision == "fp32" else "float32",
             tuple(-1 if d is None else d for d in shape[1:]))
            for name, (_, shape, dtype) in zip(self.output_names, self.program.outputs, strict=True)
        ]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        o = self.options
        return {"kind": "torch", "simulated": False, "device": str(self.device),
                "file": Path(self.path).name, "compile": o.compile,
                "channels_last": o.channels_last, "precision": o.precision,
                "cuda_graphs": o.cuda_graphs,
                "batch": "dynamic" if self.program.fixed_batch is None else self.program.fixed_batch}  # fmt: skip

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.last_stages = None
        check_input(batch, self.input_dtype, self.input_shape)
        fixed = self.program.fixed_batch
        n = int(batch.shape[0])
        if fixed is not None and n != fixed:
            return self._run_fixed(batch, fixed)
        if self.device.is_gpu:
            return self._run_gpu(batch)
        return self._run_cpu(batch)

    # -- the CPU -----------------------------------------------------------------------------
    def _run_cpu(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch))  # the batcher's buffer, in place
        if self.options.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.program.module(x)
        return [t.detach().float().numpy() if t.dtype in _HALF(torch) else t.detach().numpy()
                for t in _as_list(out)]  # fmt: skip

    def _run_fixed(self, batch: np.ndarray, size: int) -> list[np.ndarray]:
        """A graph of one batch size: cut the batch into chunks of it, pad the last."""
        parts: list[list[np.ndarray]] = []
        stages: dict[str, float] = {}
        for start in range(0, batch.shape[0], size):
            chunk = batch[start : start + size]
            k = chunk.shape[0]
            if k < size:
                pad = np.zeros((size, *chunk.shape[1:]), chunk.dtype)
                pad[:k] = chunk
                chunk = pad
            outs = self._run_gpu(chunk) if self.device.is_gpu else self._run_cpu(chunk)
            parts.append([o[:k] for o in outs])
            for key, v in (self.last_stages or {}).items():
                stages[key] = stages.get(key, 0.0) + v
        self.last_stages = stages or None
        return [np.concatenate(col) for col in zip(*parts, strict=True)]

    # -- the GPU (not yet run on a GPU) ------------------------------------------------------------
    def _init_gpu(self, shared: TorchRuntime | None) -> None:
        from cvserve.runtime.cuda import DeviceBuffers

        torch = self.torch
        dev = torch.device("cuda", self.device.index)
        shape = tuple(int(d) for d in self.input_shape[1:] if isinstance(d, int))
        if len(shape) != len(self.input_shape) - 1:
            raise ValueError(
                f"{self.path}: the GPU path needs a fixed input row, got {self.input_shape}"
            )
        if shared is not None and shared.buffers is not None:
            self.buffers = shared.buffers
        else:
            self.buffers = DeviceBuffers(self.device.index, self.max_batch, shape,
                                         self.input_dtype, ops=TorchOps(torch, self.device.index))  # fmt: skip
        self.copy_stream = torch.cuda.Stream(device=dev)
        self.compute_stream = torch.cuda.Stream(device=dev)
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        self._autocast = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.options.precision)
        if self.options.cuda_graphs:
            for size in graph_buckets(self.max_batch):
                self._graph(size)

    def _forward(self, x: Any) -> Any:
        torch = self.torch
        if self.options.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self._autocast is not None:
                with torch.autocast("cuda", dtype=self._autocast):
                    return _as_list(self.program.module(x))
            return _as_list(self.program.module(x))

    def _graph(self, size: int) -> tuple[Any, Any, Any]:
        """The CUDA graph of batch ``size``: (graph, static input, static outputs)."""
        entry = self._graphs.get(size)
        if entry is not None:
            return entry
        torch = self.torch
        static_in = torch.zeros((size, *self.input_shape[1:]), dtype=_torch_dtype(torch, self.input_dtype),
                                device=self.program.device)  # fmt: skip
        with torch.cuda.stream(self.compute_stream):
            for _ in range(2):  # warm up (and compile) outside the capture
                self._forward(static_in)
        self.compute_stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.compute_stream):
            static_out = self._forward(static_in)
        entry = self._graphs[size] = (graph, static_in, static_out)
        return entry

    def _run_gpu(self, batch: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        n = int(batch.shape[0])
        host = batch.base if isinstance(batch.base, np.ndarray) else batch
        if host.__array_interface__["data"][0] != batch.__array_interface__["data"][0]:
            host = batch
        buffers = self.buffers
        own = host.shape[0] > buffers.rows or not host.flags.c_contiguous
        devbuf = None if own else buffers.for_host(host)
        bucket = next((b for b in graph_buckets(self.max_batch) if b >= n), None)
        use_graph = self.options.cuda_graphs and bucket is not None
        with self._lock:  # one batch at a time per instance (its streams and graphs)
            if use_graph:
                graph, dest, static_out = self._graph(bucket)
            elif devbuf is not None:
                dest = devbuf
            else:
                dest = torch.empty((n, *batch.shape[1:]), dtype=_torch_dtype(torch, batch.dtype),
                                   device=self.program.device)  # fmt: skip
            e0, e1, e2, e3 = self._events
            src = torch.from_numpy(
                batch if batch.flags.c_contiguous else np.ascontiguousarray(batch)
            )
            with torch.cuda.stream(self.copy_stream):
                e0.record()
                for op, a, b in upload_plan(batch, buffers.magic):
                    if op == "host":
                        dest[a:b].copy_(src[a:b], non_blocking=True)
                    elif devbuf is not None:
                        dest[a].copy_(devbuf[b])
                e1.record()
            with torch.cuda.stream(self.compute_stream):
                self.compute_stream.wait_event(e1)
                if use_graph:
                    graph.replay()
                    outs = [o[:n] for o in static_out]
                else:
                    outs = self._forward(dest[:n])
                e2.record()
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(e2)
                host_outs = []
                for o in outs:
                    o = o.float() if o.dtype in _HALF(torch) else o
                    h = torch.empty(o.shape, dtype=o.dtype, pin_memory=True)
                    h.copy_(o, non_blocking=True)
                    host_outs.append(h)
                e3.record()
            e3.synchronize()
            self.last_stages = {
                "h2d": e0.elapsed_time(e1) / 1e3,
                "infer": e1.elapsed_time(e2) / 1e3,
                "d2h": e2.elapsed_time(e3) / 1e3,
            }
        return [h.numpy() for h in host_outs]


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes a CUDA graph is captured for: powers of two below ``max_batch``, and
    ``max_batch`` itself; a batch runs in the smallest bucket that holds it."""
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max(1, max_batch))
    return sizes


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, list | tuple):
        return list(out)
    if isinstance(out, dict):
        return list(out.values())
    return [out]


def _HALF(torch: Any) -> tuple[Any, ...]:  # noqa: N802
    return (torch.float16, torch.bfloat16)


def _check_cuda(torch: Any, device: Device) -> None:
    """A clear start-up error when this torch has no CUDA or no such device."""
    if not torch.cuda.is_available():
        build = getattr(torch.version, "cuda", None)
        why = (
            "a CPU build of torch"
            if build is None
            else f"torch built for CUDA {build}, but no GPU is visible"
        )
        raise DeviceUnavailable(
            f"--runtime torch --device {device}: {why} (torch {torch.__version__})"
        )
    count = torch.cuda.device_count()
    if device.index >= count:
        raise DeviceUnavailable(
            f"--runtime torch --device {device}: this machine has {count} GPU(s)"
        )
