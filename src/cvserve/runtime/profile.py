"""``cvserve profile``: measure a real runtime's latency per batch size on this machine and
keep it as a :class:`~cvserve.runtime.simulated.SimProfile` for the simulated accelerator.
"""

from __future__ import annotations

import logging
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cvserve.runtime.onnx import OrtOptions, OrtRuntime
from cvserve.runtime.sim_profile import SimProfile

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BATCH_SIZES", "measure_profile", "profile_table"]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def measure_profile(
    onnx_path: str | Path,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 5,
    threads: int = 0,
    *,
    warmup: int = 1,
    item_shape: Sequence[int] | None = None,
    model: str | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> SimProfile:
    """Median latency of ``repeats`` runs (after ``warmup`` runs) of onnxruntime at each
    batch size, on random inputs of the model's input shape and dtype.

    ``threads`` are onnxruntime intra-op threads (0: onnxruntime's choice, one per core).
    ``item_shape`` (one input without the batch axis) is needed only when the model's
    input has symbolic sizes. ``progress(batch, median_s)`` is called after each size.
    The spread (min/max ms) is kept in the profile's ``measured`` field.
    """
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    rt = OrtRuntime(onnx_path, OrtOptions(intra_op_threads=threads, providers=tuple(providers)))
    declared = rt.input_shape[1:]
    if item_shape is None:
        if not all(isinstance(d, int) and d > 0 for d in declared):
            raise ValueError(
                f"{onnx_path}: input {rt.input_shape} has symbolic sizes; give item_shape"
            )
        item_shape = declared
    item = tuple(int(d) for d in item_shape)
    rng = np.random.default_rng(seed)
    medians: dict[int, float] = {}
    spread: dict[str, list[float]] = {}
    for b in sizes:
        shape = (b, *item)
        if np.dtype(rt.input_dtype).kind in "ui":
            x = rng.integers(0, 256, size=shape).astype(rt.input_dtype)
        else:
            x = rng.standard_normal(shape, dtype=np.float32).astype(rt.input_dtype)
        for _ in range(warmup):
            rt.run(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rt.run(x)
            times.append(time.perf_counter() - t0)
        medians[b] = statistics.median(times) * 1000.0
        spread[str(b)] = [min(times) * 1000.0, max(times) * 1000.0]
        log.debug("batch %d: median %.2f ms over %d runs", b, medians[b], repeats)
        if progress is not None:
            progress(b, medians[b] / 1000.0)

    from cvserve.machine import machine_info

    machine = machine_info()
    import onnxruntime as ort

    n_threads = threads or machine.get("usable_cores") or machine["cores"]
    providers_used = ", ".join(rt.providers)
    return SimProfile(
        latency_ms=medians,
        model=model or Path(onnx_path).parent.name,
        device=machine["cpu_model"],
        runtime=f"onnxruntime {ort.__version__} ({providers_used})",
        source=(
            f"measured by cvserve profile on {machine['cpu_model']}, onnxruntime "
            f"{ort.__version__} {providers_used}, {n_threads} threads; median of {repeats} "
            f"runs after {warmup} warm-up, random {rt.input_dtype} inputs"
        ),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=machine,
        input_shape=[None, *item],
        input_dtype=rt.input_dtype,
        extra={
            "measured": {
                "repeats": repeats,
                "warmup": warmup,
                "intra_op_threads": threads,
                "min_max_ms": spread,
            }
        },
    )


def profile_table(profile: SimProfile, title: str | None = None, width: int = 80) -> list[str]:
    """A small text table of a profile (fits 80 columns), under ``title`` wrapped to
    ``width`` (a CPU's name can be long)."""
    spread = (profile.extra.get("measured") or {}).get("min_max_ms") or {}
    lines = textwrap.wrap(title, width) if title else []
    lines += [f"{'batch':>6} {'ms/batch':>10} {'min-max ms':>17} {'ms/image':>10} {'images/s':>10}"]
    for b, ms in profile.latency_ms.items():
        lo_hi = spread.get(str(b))
        rng = f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}" if lo_hi else "-"
        lines.append(f"{b:>6} {ms:>10.2f} {rng:>17} {ms / b:>10.3f} {1000.0 * b / ms:>10.1f}")
    return lines
