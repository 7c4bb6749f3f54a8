"""onnxruntime sessions: CPU provider by default, CUDA/TensorRT where present."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bool)": "bool",
    **{f"tensor({t})": t for t in ("int8", "int16", "int32", "int64")},
    **{f"tensor({t})": t for t in ("uint8", "uint16", "uint32", "uint64")},
}


class RuntimeInputError(ValueError):
    """A batch does not match the model's declared input (shape or dtype)."""


class Runtime(Protocol):
    """What the batcher needs from an inference engine."""

    input_name: str
    input_dtype: str
    output_names: list[str]

    def run(self, batch: np.ndarray) -> list[np.ndarray]: ...

    def output_signature(self, item_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
        """(name, numpy dtype, row shape; -1 where the graph leaves a dimension open) of
        each output, for input rows of ``item_shape``."""
        ...


@dataclass(frozen=True)
class OrtOptions:
    """onnxruntime threading knobs; ``intra_op_threads=0`` lets onnxruntime pick."""

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    # Spinning threads burn the cores preprocessing needs while they wait for work.
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    #: ``cpu`` or ``cuda[:N]``; a GPU takes its providers from
    #: :func:`cvserve.runtime.providers.select_providers` (``providers`` is then ignored).
    device: str = "cpu"
    #: On a GPU: ``auto`` (TensorRT when present, else CUDA), ``tensorrt`` or ``cuda``.
    gpu_provider: str = "auto"
    #: TensorRT builds FP16 kernels (where they are faster).
    fp16: bool = False
    #: TensorRT's engine and timing caches live here (no cache when None).
    trt_cache: str | None = None


class OrtRuntime:
    """One onnxruntime session (one model instance). ``run`` is thread-safe per session,
    but cvserve gives each instance worker its own session so they never share one."""

    def __init__(self, path: str | Path, options: OrtOptions | None = None) -> None:
        import onnxruntime as ort

        self.options = options = options or OrtOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        so.add_session_config_entry(
            "session.inter_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.graph_optimization]
        self.session = _open_session(ort, str(path), so, options)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{path}: expected one image input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)
        self.input_dtype = _ORT_DTYPES.get(inputs[0].type, inputs[0].type)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def output_signature(self, item_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
        return [
            (
                o.name,
                _ORT_DTYPES.get(o.type, "float32"),
                tuple(d if isinstance(d, int) and d >= 0 else -1 for d in o.shape[1:]),
            )
            for o in self.session.get_outputs()
        ]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        check_input(batch, self.input_dtype, self.input_shape)
        return self.session.run(self.output_names, {self.input_name: batch})


def check_input(batch: np.ndarray, dtype: str, shape: list) -> None:
    """Raise :class:`RuntimeInputError` unless ``batch`` has the model's input ``dtype``
    and ``shape`` (batch axis free; None or a name where the graph leaves one open)."""
    if str(batch.dtype) != dtype:
        raise RuntimeInputError(f"input dtype {batch.dtype}, model wants {dtype}")
    if batch.ndim != len(shape) or any(
        isinstance(w, int) and w != g for w, g in zip(shape[1:], batch.shape[1:], strict=True)
    ):
        raise RuntimeInputError(f"input shape {list(batch.shape)}, model wants {shape}")


def _open_session(ort, path: str, so, options: OrtOptions):
    """An InferenceSession on ``options.device``: never a CPU session when a GPU was asked."""
    from cvserve.runtime.providers import (
        check_session_providers,
        parse_device,
        select_providers,
    )

    device = parse_device(options.device)
    if not device.is_gpu:
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        return ort.InferenceSession(path, so, providers=providers)
    chosen = select_providers(
        device,
        ort.get_available_providers(),
        want=options.gpu_provider,
        fp16=options.fp16,
        trt_cache=options.trt_cache,
    )
    if options.trt_cache:
        Path(options.trt_cache).expanduser().mkdir(parents=True, exist_ok=True)
    _preload_cuda_libraries(ort)
    session = ort.InferenceSession(
        path, so, providers=[n for n, _ in chosen], provider_options=[o for _, o in chosen]
    )
    check_session_providers(device, chosen, session.get_providers())
    log.info("%s on %s: providers %s", path, device, session.get_providers())
    return session


def _preload_cuda_libraries(ort) -> None:
    """Load the CUDA/cuDNN libraries that pip installed (the nvidia-* wheels of the ``gpu``
    extra) before the first GPU session, as onnxruntime-gpu asks when they are not on the
    system's library path. Not yet run on a GPU."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as e:  # a system-wide CUDA install may need none of them
        log.debug("onnxruntime.preload_dlls(): %s", e)
