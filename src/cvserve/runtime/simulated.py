"""A simulated accelerator: takes the time a latency profile says, burns no host CPU.

:class:`SimulatedRuntime` stands in for :class:`~cvserve.runtime.onnx.OrtRuntime`. It reads
the model's inputs and outputs from its ONNX file and answers every batch with read-only
outputs of the right shapes and dtypes (a fixed, seeded pattern), after *sleeping* for the
profile's latency at that batch size. So on a CPU-only machine every task head, encoder
and the server run for real while the "DNN" leaves the cores to the host-side work, as a
fast accelerator would.

A :class:`SimDevice` is the accelerator: ``devices`` slots shared by all instances of a
served model. A batch holds a slot for its host-to-device copy, its inference and its
device-to-host copy (copies at ``h2d_gbps`` GB/s when given), so one device runs one batch
at a time and instances beyond the devices wait for one. Each run reports how its time
split in :attr:`SimulatedRuntime.last_stages`. Profiles: :mod:`cvserve.runtime.sim_profile`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.runtime.onnx import RuntimeInputError
from cvserve.runtime.sim_profile import PROFILE_SCHEMA, SimProfile, packaged_profiles

log = logging.getLogger(__name__)

__all__ = [
    "PROFILE_SCHEMA",
    "SimDevice",
    "SimModel",
    "SimProfile",
    "SimulatedRuntime",
    "packaged_profiles",
]


# --- the device --------------------------------------------------------------------------
class SimDevice:
    """``devices`` simulated accelerators shared by the instances of one served model."""

    def __init__(
        self, profile: SimProfile | str, devices: int = 1, h2d_gbps: float | None = None
    ) -> None:
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        if h2d_gbps is not None and not h2d_gbps > 0:
            raise ValueError(f"h2d_gbps must be > 0, got {h2d_gbps}")
        self.profile = SimProfile.parse(profile)
        self.devices = devices
        self.h2d_gbps = h2d_gbps
        self._slots = threading.Semaphore(devices)

    def copy_s(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` between host and device (0 when copies are off)."""
        return nbytes / (self.h2d_gbps * 1e9) if self.h2d_gbps else 0.0

    def acquire(self) -> None:
        self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "simulated",
            "simulated": True,
            "profile": self.profile.describe(),
            "devices": self.devices,
            "h2d_gbps": self.h2d_gbps,
        }


def _sleep_until(deadline: float) -> None:
    """Sleep (never spin) until ``perf_counter() >= deadline``."""
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)


# --- the model's signature and outputs ------------------------------------------------------
class SimModel:
    """What a simulated runtime knows of a model: its input and outputs (from the ONNX
    file) and the outputs it answers with. Shared by a model's instances; thread-safe."""

    def __init__(self, onnx_path: str | Path) -> None:
        import onnx

        self.path = str(onnx_path)
        proto = onnx.load(self.path, load_external_data=False)
        graph = proto.graph
        inits = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise ValueError(f"{onnx_path}: expected one image input, found {len(inputs)}")
        inp = inputs[0]
        self.input_name = inp.name
        self.input_dtype = str(_np_dtype(inp.type.tensor_type.elem_type))
        self.input_shape = _dims(inp.type.tensor_type.shape)
        self.output_names = [o.name for o in graph.output]
        self.output_dtypes = [_np_dtype(o.type.tensor_type.elem_type) for o in graph.output]
        self._lock = threading.Lock()
        self._rows: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._batches: dict[tuple[int, tuple[int, ...]], list[np.ndarray]] = {}

    def outputs(self, batch: int, item_shape: tuple[int, ...]) -> list[np.ndarray]:
        """Read-only outputs for a batch of ``batch`` inputs of ``item_shape`` each."""
        key = (batch, item_shape)
        out = self._batches.get(key)
        if out is None:
            rows = self._row_patterns(item_shape)
            out = [np.broadcast_to(r, (batch, *r.shape)) for r in rows]  # read-only views
            with self._lock:
                self._batches[key] = out
        return out

    def row_shapes(self, item_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-row output shapes for inputs of ``item_shape`` (batch axis dropped)."""
        return [r.shape for r in self._row_patterns(item_shape)]

    def _row_patterns(self, item_shape: tuple[int, ...]) -> list[np.ndarray]:
        rows = self._rows.get(item_shape)
        if rows is not None:
            return rows
        with self._lock:
            rows = self._rows.get(item_shape)
            if rows is None:
                shapes = self._infer_row_shapes(item_shape)
                rows = [
                    _pattern(name, shape, dtype)
                    for name, shape, dtype in zip(
                        self.output_names, shapes, self.output_dtypes, strict=True
                    )
                ]
                self._rows[item_shape] = rows
        return rows

    def _infer_row_shapes(self, item_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = _shape_inference(self.path, self.input_name, item_shape)
        if shapes is not None:
            return shapes
        log.info(
            "%s: ONNX shape inference leaves output shapes for input %s unknown; "
            "running the real model once (onnxruntime, batch 1) to learn them",
            self.path,
            [1, *item_shape],
        )
        return _run_once(self.path, self.input_name, self.input_dtype, item_shape)


_PROBE_BATCH = 2  # a batch size no fixed dimension is likely to equal by chance


def _shape_inference(path: str, input_name: str, item: tuple[int, ...]):
    """Per-row output shapes from onnx shape inference at a concrete input shape, or None
    when any output dimension stays unknown (or the batch axis does not follow the input)."""
    import onnx
    from onnx import shape_inference

    proto = onnx.load(path, load_external_data=False)
    graph = proto.graph
    for inp in graph.input:
        if inp.name == input_name:
            shape = inp.type.tensor_type.shape
            shape.ClearField("dim")
            for d in (_PROBE_BATCH, *item):
                shape.dim.add().dim_value = int(d)
    for out in graph.output:  # exported symbolic names must not pin the inferred shapes
        out.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:  # any failure means: ask the real model
        log.debug("%s: shape inference failed: %s", path, e)
        return None
    shapes = []
    for out in inferred.graph.output:
        tt = out.type.tensor_type
        if not tt.HasField("shape"):
            return None
        dims = _dims(tt.shape)
        if not dims or dims[0] != _PROBE_BATCH or not all(isinstance(d, int) for d in dims):
            return None
        shapes.append(tuple(dims[1:]))
    return shapes


def _run_once(path: str, input_name: str, dtype: str, item: tuple[int, ...]):
    from cvserve.runtime.onnx import OrtOptions, OrtRuntime

    rt = OrtRuntime(path, OrtOptions(intra_op_threads=1))
    outs = rt.run(np.zeros((1, *item), dtype=dtype))
    return [tuple(o.shape[1:]) for o in outs]


def _pattern(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A fixed, deterministic, read-only output row: uniform [0, 1) floats (seeded by the
    output's name and shape), zeros for other dtypes."""
    if np.issubdtype(dtype, np.floating):
        seed = zlib.crc32(f"{name}{shape}".encode())
        row = np.random.default_rng(seed).random(shape, dtype=np.float32).astype(dtype)
    else:
        row = np.zeros(shape, dtype=dtype)
    row.setflags(write=False)
    return row


def _np_dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _dims(shape) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


# --- the runtime ----------------------------------------------------------------------------
class SimulatedRuntime:
    """The :class:`~cvserve.runtime.onnx.Runtime` protocol on a simulated accelerator.

    ``run`` validates the batch like onnxruntime would, waits for a free device, sleeps for
    the copies and the profile's latency, and returns read-only outputs. Per run,
    :attr:`last_stages` says how its time split: ``batch_wait`` (waiting for a device),
    ``h2d``/``d2h`` (only with a copy rate) and ``infer``, in seconds. One instance per
    instance worker (the attribute is per instance); the device and model are shared.
    """

    simulated = True

    def __init__(
        self,
        onnx_path: str | Path,
        device: SimDevice | SimProfile | str,
        *,
        model: SimModel | None = None,
    ) -> None:
        self.device = device if isinstance(device, SimDevice) else SimDevice(device)
        self.model = model or SimModel(onnx_path)
        m = self.model
        self.input_name = m.input_name
        self.input_dtype = m.input_dtype
        self.input_shape = list(m.input_shape)
        self.output_names = list(m.output_names)
        self.providers = ["SimulatedAccelerator"]
        self.last_stages: dict[str, float] | None = None

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.last_stages = None
        if str(batch.dtype) != self.input_dtype:
            raise RuntimeInputError(f"input dtype {batch.dtype}, model wants {self.input_dtype}")
        want = self.input_shape
        if (
            batch.ndim != len(want)
            or batch.shape[0] < 1
            or any(
                isinstance(w, int) and w > 0 and w != g
                for w, g in zip(want[1:], batch.shape[1:], strict=True)
            )
        ):
            raise RuntimeInputError(f"input shape {list(batch.shape)}, model wants {want}")
        n = int(batch.shape[0])
        outputs = self.model.outputs(n, tuple(int(d) for d in batch.shape[1:]))
        dev = self.device
        out_bytes = sum(o.dtype.itemsize * math.prod(o.shape) for o in outputs)
        t0 = time.perf_counter()
        dev.acquire()
        try:
            t1 = time.perf_counter()
            _sleep_until(t1 + dev.copy_s(batch.nbytes))
            t2 = time.perf_counter()
            _sleep_until(t2 + dev.profile.latency_s(n))
            t3 = time.perf_counter()
            _sleep_until(t3 + dev.copy_s(out_bytes))
            t4 = time.perf_counter()
        finally:
            dev.release()
        stages = {"batch_wait": t1 - t0}
        if dev.h2d_gbps:
            stages.update(h2d=t2 - t1, infer=t3 - t2, d2h=t4 - t3)
        else:
            stages["infer"] = t4 - t1
        self.last_stages = stages
        return list(outputs)

    def output_signature(self, item_shape: tuple[int, ...]) -> list[tuple[str, str, tuple]]:
        m = self.model
        rows = m.row_shapes(tuple(item_shape))
        return [
            (n, str(dt), tuple(r))
            for n, dt, r in zip(m.output_names, m.output_dtypes, rows, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return self.device.describe()
