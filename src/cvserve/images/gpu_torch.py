"""GPU preprocessing with what PyTorch ships: torchvision's nvJPEG decoder, and the resize +
crop + normalize of :mod:`cvserve.images.gpu_resize` as torch matrix products, written
straight into the torch runtime's device input batch.

:class:`TorchvisionBackend` is the :class:`~cvserve.images.gpu.DeviceBackend` of
``--runtime torch --preprocess gpu``: :class:`~cvserve.images.gpu.GpuPreprocessor` routes
each image (JPEGs to the device, the rest and every device failure to the CPU path, per
image), the backend decodes it (:class:`BatchedDecoder`: the images that wait together are
decoded in one ``decode_jpeg`` call) and :func:`resize_normalize_torch` writes the model
input into the device row of the batch (:class:`~cvserve.runtime.cuda.DeviceBuffers`,
the same buffers, row marks and upload plan as the onnxruntime GPU path).

The geometry is the CPU path's (Pillow's filter weights, :func:`device_geometry`); the
arithmetic is tested on CPU tensors against the NumPy version and the CPU path. torch and
torchvision are imported only when a backend is made; torchvision only for the decode.
The device code has not yet run on a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from cvserve.images.gpu_resize import DeviceGeometry
from cvserve.images.spec import PreprocessSpec

__all__ = ["BatchedDecoder", "TorchvisionBackend", "resize_normalize_torch"]


def resize_normalize_torch(
    torch: Any, image: Any, geom: DeviceGeometry, spec: PreprocessSpec, out: Any
) -> None:
    """:func:`cvserve.images.gpu_resize.resize_normalize` on torch tensors: ``image`` is
    ``H x W x 3`` uint8 RGB (a view of a decoder's ``3 x H x W`` is fine), ``out`` a
    tensor of ``spec.input_shape`` on the same device. Pixels are rounded to uint8 after
    resizing, as the CPU path's Pillow image is, before normalizing."""
    dev = image.device
    x = image.permute(2, 0, 1).to(torch.float32)  # (3, H, W)
    wy = torch.as_tensor(geom.wy, device=dev)  # (h, H)
    wx = torch.as_tensor(geom.wx, device=dev)  # (w, W)
    y = torch.matmul(torch.matmul(wy, x), wx.T)  # (3, h, w): rows first, as NumPy's
    y = torch.round(y).clamp_(0.0, 255.0)
    if spec.channel_order == "BGR":
        y = y.flip(0)
    if spec.layout != "NCHW":
        y = y.permute(1, 2, 0)
        bshape: tuple[int, ...] = (1, 1, 3)
    else:
        bshape = (3, 1, 1)
    if spec.dtype == "uint8":
        out.copy_(y.to(torch.uint8))
        return
    std = np.asarray(spec.std, dtype=np.float64)
    scale = (spec.rescale / std).astype(np.float32).reshape(bshape)
    shift = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32).reshape(bshape)
    out.copy_(y * torch.as_tensor(scale, device=dev) + torch.as_tensor(shift, device=dev))


class BatchedDecoder:
    """Coalesces concurrent decodes: a caller that finds no decode running becomes the
    leader and decodes everything waiting in one call of ``decode_many`` (a list of bytes
    in, a list of images or exceptions out); the others wait for their own result. One
    image alone is decoded at once: nothing waits for company."""

    def __init__(self, decode_many: Callable[[list[bytes]], list[Any]], max_batch: int = 64):
        self.decode_many = decode_many
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []  # [data, event, result]
        self._leader = False
        #: (calls, images) decoded: images / calls is the mean decode batch.
        self.calls = 0
        self.images = 0

    def decode(self, data: bytes) -> Any:
        item: list[Any] = [data, threading.Event(), None]
        with self._lock:
            self._pending.append(item)
            lead = not self._leader
            if lead:
                self._leader = True
        if not lead:
            item[1].wait()
        else:
            self._lead()
        result = item[2]
        if isinstance(result, BaseException):
            raise result
        return result

    def _lead(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = (
                    self._pending[: self.max_batch],
                    self._pending[self.max_batch :],
                )
                if not batch:
                    self._leader = False
                    return
            try:
                results = self.decode_many([it[0] for it in batch])
            except Exception:  # the batch call failed: each image alone says why
                results = [self._one(it[0]) for it in batch]
            self.calls += 1
            self.images += len(batch)
            for it, res in zip(batch, results, strict=True):
                it[2] = res
                it[1].set()

    def _one(self, data: bytes) -> Any:
        try:
            return self.decode_many([data])[0]
        except Exception as e:
            return e


class TorchvisionBackend:
    """:class:`~cvserve.images.gpu.DeviceBackend` on an NVIDIA GPU with PyTorch alone:
    ``torchvision.io.decode_jpeg(device='cuda')`` (nvJPEG), batched across waiting
    requests, torch for the arithmetic, rows in ``buffers``
    (:class:`cvserve.runtime.cuda.DeviceBuffers` with torch's allocator). One CUDA stream
    per preprocessing thread. Not yet run on a GPU."""

    def __init__(self, buffers: Any, device_index: int = 0, *, decode_many=None) -> None:  # noqa: ANN001
        from cvserve.runtime.torchrt import import_torch

        self.torch = torch = import_torch()
        self.xp = torch
        self.buffers = buffers
        self.magic = buffers.magic
        self.device = torch.device("cuda", device_index)
        self._local = threading.local()
        self.decoder = BatchedDecoder(decode_many or self._decode_many)

    def _decode_many(self, datas: list[bytes]) -> list[Any]:
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError as e:
            from cvserve.runtime.providers import DeviceUnavailable

            raise DeviceUnavailable(
                f"--preprocess gpu with --runtime torch needs torchvision ({e})"
            ) from None
        torch = self.torch
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        with torch.cuda.stream(self._stream()):
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device,
                                 apply_exif_orientation=True)  # fmt: skip
        self._stream().synchronize()  # the images are read on other threads' streams
        return list(images)

    def _stream(self) -> Any:
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = self.torch.cuda.Stream(device=self.device)
        return s

    def decode(self, data: bytes) -> Any:
        """``H x W x 3`` uint8 (a view of the decoder's ``3 x H x W``) on the device."""
        image = self.decoder.decode(data)
        return None if image is None else image.permute(1, 2, 0)

    def resize_normalize(self, image: Any, geom: DeviceGeometry, spec: PreprocessSpec, out: Any):
        resize_normalize_torch(self.torch, image, geom, spec, out)

    def row(self, host_buffer: np.ndarray, index: int) -> Any:
        return self.buffers.row(host_buffer, index)

    def synchronize(self) -> None:
        self._stream().synchronize()

    @contextlib.contextmanager
    def activate(self):
        with self.torch.cuda.stream(self._stream()):
            yield
