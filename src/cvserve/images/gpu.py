"""Preprocessing on the GPU: nvJPEG decode (through nvImageCodec), then resize + crop +
normalize on the device into the model's device input buffer, with the CPU path's geometry.

What runs where:

* :func:`route` decides per image: JPEGs of 8-bit precision go to the device, every other
  format to the CPU; ``--preprocess auto`` also weighs the image's declared size against
  the measured cost of each path (:class:`AutoPolicy`).
* :class:`GpuPreprocessor` runs one image: a failed device decode falls back to the CPU
  path for that image only, so its batch-mates never notice.
* The resize is Pillow's own separable filter applied as two matrix products
  (:mod:`cvserve.images.gpu_resize`); the same code runs on NumPy (tested against Pillow)
  and on CuPy (the device).

Why nvImageCodec and not DALI: cvserve already batches requests itself and hands each
image a slot as it arrives; nvImageCodec decodes one image (or a list) when asked, into a
device array that CuPy reads in place (``__cuda_array_interface__``). DALI is a pipeline
with its own executor, fixed batch, prefetch queues and threads, made for feeding
training loops; fitting it under a request-driven batcher adds a second batching stage
and its latency, and its wheel is several times larger.

Device code here is marked "not yet run on a GPU": it is written against the documented
APIs and exercised here only through the NumPy stand-in backend of the tests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cvserve.images.decode import jpeg_header, sniff_format
from cvserve.images.gpu_resize import device_geometry, resize_normalize, resize_weights
from cvserve.images.preprocess import ImageMeta, Preprocessor
from cvserve.images.spec import PreprocessSpec
from cvserve.runtime.device_rows import mark_row

log = logging.getLogger(__name__)

__all__ = [
    "AutoPolicy",
    "DeviceBackend",
    "GpuPreprocessor",
    "LinearCost",
    "device_geometry",
    "jpeg_header",
    "resize_normalize",
    "resize_weights",
    "route",
]

#: SOF markers nvJPEG decodes: baseline, extended and progressive Huffman (not lossless,
#: not arithmetic coding).
_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)


# --- which images go to the device (jpeg_header: cvserve.images.decode) -----------------
@dataclass(frozen=True)
class LinearCost:
    """Seconds to preprocess one image on one path: ``fixed_s + per_mpix_s * megapixels``."""

    fixed_s: float
    per_mpix_s: float

    def __call__(self, pixels: int) -> float:
        return self.fixed_s + self.per_mpix_s * pixels / 1e6


class AutoPolicy:
    """``--preprocess auto``: each image goes where it would finish sooner.

    The estimate of each path is the work already queued on it (seconds, shared by its
    threads) plus this image's cost from its declared size. Costs start from priors and
    follow the measured times (exponentially weighted fit per path), so the split adapts
    to the machine: small images, cheap on a reduced-scale CPU decode, stay on the CPU
    while the device takes the large ones.
    """

    def __init__(
        self,
        cpu: LinearCost = LinearCost(0.8e-3, 6e-3),
        gpu: LinearCost = LinearCost(0.6e-3, 0.4e-3),
        *,
        cpu_threads: int = 1,
        alpha: float = 0.05,
    ) -> None:
        self.costs = {"cpu": cpu, "gpu": gpu}
        self.cpu_threads = max(1, cpu_threads)
        self.alpha = alpha
        self._fit = {k: _EwFit() for k in self.costs}
        self._queued = {"cpu": 0.0, "gpu": 0.0}
        self._lock = threading.Lock()

    @staticmethod
    def choose(
        pixels: int, cpu: LinearCost, gpu: LinearCost, cpu_queued_s: float = 0.0,
        gpu_queued_s: float = 0.0, cpu_threads: int = 1,
    ) -> str:  # fmt: skip
        """``"gpu"`` when the device finishes this image sooner, else ``"cpu"`` (ties: CPU,
        which keeps the device free for the batch's inference)."""
        t_cpu = cpu_queued_s / max(1, cpu_threads) + cpu(pixels)
        t_gpu = gpu_queued_s + gpu(pixels)
        return "gpu" if t_gpu < t_cpu else "cpu"

    def decide(self, pixels: int) -> str:
        with self._lock:
            where = self.choose(pixels, self.costs["cpu"], self.costs["gpu"],
                                self._queued["cpu"], self._queued["gpu"], self.cpu_threads)  # fmt: skip
            self._queued[where] += self.costs[where](pixels)
        return where

    def done(self, where: str, pixels: int, seconds: float | None, estimated: bool = True) -> None:
        """Release the queued estimate that :meth:`decide` added (``estimated``) and
        record a measured time (None: the attempt failed, nothing learnt)."""
        with self._lock:
            if estimated:
                self._queued[where] = max(0.0, self._queued[where] - self.costs[where](pixels))
            if seconds is None:
                return
            fit = self._fit[where]
            fit.add(pixels / 1e6, seconds, self.alpha)
            est = fit.line()
            if est is not None:
                self.costs[where] = LinearCost(*est)


@dataclass
class _EwFit:
    """Exponentially weighted least squares of ``y = a + b x``."""

    count: int = 0
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float, alpha: float) -> None:
        k = 1.0 - alpha
        self.count += 1
        self.n = self.n * k + 1.0
        self.sx = self.sx * k + x
        self.sy = self.sy * k + y
        self.sxx = self.sxx * k + x * x
        self.sxy = self.sxy * k + x * y

    def line(self) -> tuple[float, float] | None:
        if self.count < 8:
            return None
        var = self.n * self.sxx - self.sx * self.sx
        if var <= 1e-12 * max(1.0, self.n * self.sxx):  # one size only: keep the slope
            return None
        b = max(0.0, (self.n * self.sxy - self.sx * self.sy) / var)
        a = max(0.0, (self.sy - b * self.sx) / self.n)
        return a, b


def route(data: bytes, mode: str, policy: AutoPolicy | None = None) -> tuple[str, str, int]:
    """Where one image is preprocessed: ``(path, reason, declared_pixels)``, ``path`` being
    ``"gpu"`` or ``"cpu"``. ``mode`` is ``cpu``, ``gpu`` or ``auto``."""
    if mode == "cpu":
        return "cpu", "asked", 0
    head = jpeg_header(data)
    if head is None:
        fmt = sniff_format(data)
        return "cpu", f"format {fmt.lower() if fmt else 'unknown'}", 0
    pixels = head.width * head.height
    if head.precision != 8 or head.sof not in _NVJPEG_SOF:
        return "cpu", f"jpeg sof=0x{head.sof:02x} precision={head.precision}", pixels
    if pixels == 0:
        return "cpu", "jpeg without a size", 0
    if mode == "auto":
        where = (policy or AutoPolicy()).decide(pixels)
        return where, "policy", pixels
    return "gpu", "jpeg", pixels


# --- the preprocessor -------------------------------------------------------------------------
class DeviceBackend(Protocol):
    """What :class:`GpuPreprocessor` needs from a device (CuPy + nvImageCodec, or a NumPy
    stand-in in tests)."""

    xp: Any
    magic: bytes

    def decode(self, data: bytes) -> Any:
        """An ``H x W x 3`` uint8 RGB upright array on the device; raises or returns None
        when the device cannot decode it."""
        ...

    def row(self, host_buffer: np.ndarray, index: int) -> Any:
        """Row ``index`` of the device buffer that mirrors ``host_buffer``."""
        ...

    def synchronize(self) -> None:
        """Wait for this thread's device work."""
        ...

    def activate(self) -> AbstractContextManager:
        """Make this thread's device and stream current for array arithmetic."""
        ...


@dataclass
class PreprocessCounts:
    """Where images went, and why some fell back."""

    gpu: int = 0
    cpu: int = 0
    fallback: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class GpuPreprocessor:
    """Per image: the device (decode, resize, normalize into the device batch row) or the
    CPU :class:`~cvserve.images.preprocess.Preprocessor` into the host row. A device
    failure falls back to the CPU for that image only."""

    def __init__(
        self,
        spec: PreprocessSpec,
        backend: DeviceBackend,
        cpu: Preprocessor,
        *,
        mode: str = "gpu",
        policy: AutoPolicy | None = None,
    ) -> None:
        if mode not in ("gpu", "auto"):
            raise ValueError(f"GpuPreprocessor mode {mode!r}: gpu or auto")
        self.spec = spec
        self.backend = backend
        self.cpu = cpu
        self.mode = mode
        self.policy = policy or (AutoPolicy() if mode == "auto" else None)
        self.counts = PreprocessCounts()
        self._lock = threading.Lock()

    def _count(self, where: str, reason: str | None = None) -> None:
        with self._lock:
            setattr(self.counts, where, getattr(self.counts, where) + 1)
            if reason:
                self.counts.reasons[reason] = self.counts.reasons.get(reason, 0) + 1

    def run(self, data: bytes, host_buffer: np.ndarray, index: int) -> ImageMeta:
        """Preprocess ``data`` into row ``index`` of the batch (device row, or host row)."""
        where, reason, pixels = route(data, self.mode, self.policy)
        host_row = host_buffer[index]
        if where == "gpu":
            t0 = time.perf_counter()
            meta = self._run_device(data, host_buffer, index)
            if self.policy is not None:
                took = time.perf_counter() - t0
                self.policy.done("gpu", pixels, took if meta is not None else None)
            if meta is not None:
                self._count("gpu")
                return meta
            self._count("fallback", "device decode failed")
        else:
            self._count("cpu", reason)
        t0 = time.perf_counter()
        meta = self.cpu.run(data, host_row)  # writes the whole row: erases any mark
        if self.policy is not None and where == "cpu" and reason == "policy":
            self.policy.done("cpu", pixels, time.perf_counter() - t0)
        return meta

    def _run_device(self, data: bytes, host_buffer: np.ndarray, index: int) -> ImageMeta | None:
        """Not yet run on a GPU (the tests run it on the NumPy stand-in backend)."""
        b = self.backend
        t0 = time.perf_counter()
        try:
            image = b.decode(data)
        except Exception as e:  # nvJPEG says no: the CPU decoder will say why, or manage
            log.debug("device decode failed (%s); falling back to the CPU", e)
            return None
        if image is None or getattr(image, "ndim", 0) != 3 or image.shape[2] != 3:
            return None
        h, w = int(image.shape[0]), int(image.shape[1])
        if w * h > self.cpu.max_pixels:
            return None  # the CPU path answers 413 with its limit
        head = jpeg_header(data)
        if head is not None and len(data) < head.min_coded_bytes():
            return None  # nvJPEG padded a short stream: the CPU path answers 400 "truncated"
        geom = device_geometry((w, h), self.spec)
        if geom is None:
            return None
        b.synchronize()
        t1 = time.perf_counter()
        with b.activate():
            own = getattr(b, "resize_normalize", None)  # torch's tensors: their own arithmetic
            if own is not None:
                own(image, geom, self.spec, b.row(host_buffer, index))
            else:
                resize_normalize(b.xp, image, geom, self.spec, b.row(host_buffer, index))
        b.synchronize()  # the row is complete before the batch may run
        t2 = time.perf_counter()
        mark_row(host_buffer[index], index, b.magic)
        return ImageMeta(
            orig_size=(w, h),
            format="JPEG",
            reduced=1,
            stages={"decode": t1 - t0, "resize": t2 - t1, "normalize": 0.0},
            started=t0,
            finished=t2,
        )

    def describe(self) -> dict[str, Any]:
        c = self.counts
        out: dict[str, Any] = {"device": "gpu", "mode": self.mode, "gpu": c.gpu,
                               "cpu": c.cpu, "fallback": c.fallback, "reasons": dict(c.reasons)}  # fmt: skip
        if self.policy is not None:
            out["costs_ms"] = {
                k: {"fixed": round(v.fixed_s * 1e3, 3), "per_mpix": round(v.per_mpix_s * 1e3, 3)}
                for k, v in self.policy.costs.items()
            }
        return out


class NvImageCodecBackend:
    """:class:`DeviceBackend` on an NVIDIA GPU: nvJPEG through nvImageCodec, CuPy for the
    arithmetic, rows in ``buffers`` (:class:`cvserve.runtime.cuda.DeviceBuffers`).

    One decoder and one CUDA stream per preprocessing thread (nvImageCodec decoders are
    not meant to be shared across threads). Not yet run on a GPU.
    """

    def __init__(self, buffers: Any, device_index: int = 0) -> None:
        try:
            import cupy
            from nvidia import nvimgcodec
        except ImportError as e:
            from cvserve.runtime.providers import DeviceUnavailable

            raise DeviceUnavailable(
                f"--preprocess gpu needs nvImageCodec and CuPy ({e}): pip install "
                "'cvserve[gpu]' (nvidia-nvimgcodec-cu13[nvjpeg], cupy-cuda13x)"
            ) from None
        self.xp = cupy
        self._nv = nvimgcodec
        self.buffers = buffers
        self.magic = buffers.magic
        self.device_index = device_index
        # GPU backends only: nvImageCodec's own CPU fallback would hide a device failure
        # that cvserve's CPU path should take (and count) instead.
        self._kinds = [nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HW_GPU_ONLY,
                       nvimgcodec.BackendKind.HYBRID_CPU_GPU]  # fmt: skip
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.RGB,
            allow_any_depth=False,
        )  # fmt: skip
        self._local = threading.local()

    def _thread_state(self):
        st = getattr(self._local, "state", None)
        if st is None:
            with self.xp.cuda.Device(self.device_index):
                stream = self.xp.cuda.Stream(non_blocking=True)
            decoder = self._nv.Decoder(device_id=self.device_index, backend_kinds=self._kinds)
            st = self._local.state = (decoder, stream)
        return st

    def decode(self, data: bytes) -> Any:
        decoder, stream = self._thread_state()
        img = decoder.decode(data, params=self._params, cuda_stream=stream.ptr)
        if img is None:
            return None
        with self.xp.cuda.Device(self.device_index), stream:
            return self.xp.asarray(img)  # zero-copy view (__cuda_array_interface__)

    def row(self, host_buffer: np.ndarray, index: int) -> Any:
        return self.buffers.row(host_buffer, index)

    def synchronize(self) -> None:
        self._thread_state()[1].synchronize()

    @contextlib.contextmanager
    def activate(self):
        stream = self._thread_state()[1]
        with self.xp.cuda.Device(self.device_index), stream:
            yield
