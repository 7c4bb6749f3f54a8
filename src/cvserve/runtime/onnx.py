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
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
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
        if str(batch.dtype) != self.input_dtype:
            raise RuntimeInputError(f"input dtype {batch.dtype}, model wants {self.input_dtype}")
        want = self.input_shape
        if batch.ndim != len(want) or any(
            isinstance(w, int) and w != g for w, g in zip(want[1:], batch.shape[1:], strict=True)
        ):
            raise RuntimeInputError(f"input shape {list(batch.shape)}, model wants {want}")
        return self.session.run(self.output_names, {self.input_name: batch})
