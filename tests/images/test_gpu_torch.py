"""GPU preprocessing with PyTorch: the resize/crop/normalize arithmetic on CPU tensors (the
same code the device runs) against the NumPy version and the CPU path on the shared
photos, routing and per-image fallback through GpuPreprocessor, and the batched decoder.
torchvision's nvJPEG decode runs on a GPU only."""

from __future__ import annotations

import contextlib
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_gpu import SPEC, _psnr  # the CPU-path geometry tests' spec and PSNR

from cvserve.images.gpu import GpuPreprocessor, device_geometry, resize_normalize
from cvserve.images.gpu_torch import BatchedDecoder, resize_normalize_torch
from cvserve.images.preprocess import Preprocessor
from cvserve.images.spec import PreprocessSpec
from cvserve.runtime.device_rows import read_mark

torch = pytest.importorskip("torch", reason="the torch GPU path needs the zoo extra here")

VIT = PreprocessSpec(224, 224, resize_mode="direct", interpolation="bilinear", mean=(0.5,) * 3,
                     std=(0.5,) * 3)  # fmt: skip


def _photos(data_dir) -> list:
    return sorted(p for size in ("small", "medium", "large")
                  for p in (data_dir / "images" / size).glob("*.jpg"))  # fmt: skip


def _upright(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


class TorchCpuBackend:
    """The device, played by torch on the CPU: the arithmetic of TorchvisionBackend."""

    xp = torch

    def __init__(self, rows: int, spec: PreprocessSpec, fail: set[bytes] = frozenset()):
        self.magic = os.urandom(8)
        self.fail = fail
        self.device = torch.zeros((rows, *spec.input_shape), dtype=getattr(torch, spec.dtype))

    def decode(self, data: bytes):
        if data in self.fail:
            raise RuntimeError("nvjpeg: bitstream not supported")
        chw = torch.from_numpy(_upright(data).copy()).permute(2, 0, 1)  # as decode_jpeg gives
        return chw.permute(1, 2, 0)

    def resize_normalize(self, image, geom, spec, out):
        resize_normalize_torch(torch, image, geom, spec, out)

    def row(self, host_buffer, index):
        return self.device[index]

    def synchronize(self):
        pass

    def activate(self):
        return contextlib.nullcontext()


@pytest.mark.parametrize(
    "spec",
    [SPEC, VIT, SPEC.replace(dtype="uint8", layout="NHWC", channel_order="BGR")],
    ids=["crop", "direct", "u8-nhwc-bgr"],
)
def test_torch_arithmetic_is_the_numpy_arithmetic(data_dir, spec):
    image = _upright((data_dir / "images/medium/demo01.jpg").read_bytes())
    geom = device_geometry((image.shape[1], image.shape[0]), spec)
    want = np.empty(spec.input_shape, spec.dtype)
    resize_normalize(np, image, geom, spec, want)
    got = torch.empty(spec.input_shape, dtype=getattr(torch, spec.dtype))
    resize_normalize_torch(torch, torch.from_numpy(image.copy()), geom, spec, got)
    diff = np.abs(got.numpy().astype(np.float64) - want.astype(np.float64))
    # float32 sums in another order: a pixel may round to the next level, rarely
    assert (diff > (1.01 if spec.dtype == "uint8" else 0.02)).sum() == 0
    assert (diff > 1e-3).mean() < 0.01


def test_every_shared_photo_matches_the_cpu_path_above_40_db(data_dir):
    photos = _photos(data_dir)
    assert len(photos) >= 10
    backend = TorchCpuBackend(1, SPEC)
    pre = GpuPreprocessor(SPEC, backend, Preprocessor(SPEC))
    worst = 99.0
    for path in photos:
        data = path.read_bytes()
        try:
            ref = np.empty(SPEC.input_shape, np.float32)
            Preprocessor(SPEC, decoder="pil").run(data, ref)
        except Exception:  # the CPU path refuses it (a corrupt file): so must this path
            continue
        host = np.zeros((1, *SPEC.input_shape), np.float32)
        pre.run(data, host, 0)
        if read_mark(host[0], backend.magic) is None:  # went to the CPU (not nvJPEG's kind)
            np.testing.assert_array_equal(host[0], ref)
            continue
        worst = min(worst, _psnr(backend.device[0].numpy(), ref, SPEC))
    assert pre.counts.gpu >= 10, pre.counts
    assert worst >= 40.0, worst


def test_a_device_failure_falls_back_for_that_image_only(data_dir):
    good = (data_dir / "images/medium/demo01.jpg").read_bytes()
    bad = (data_dir / "images/medium/demo02.jpg").read_bytes()
    backend = TorchCpuBackend(2, SPEC, fail={bad})
    cpu = Preprocessor(SPEC)
    pre = GpuPreprocessor(SPEC, backend, cpu)
    host = np.zeros((2, *SPEC.input_shape), np.float32)
    pre.run(good, host, 0)
    pre.run(bad, host, 1)
    assert (pre.counts.gpu, pre.counts.fallback) == (1, 1)
    assert read_mark(host[0], backend.magic) == 0 and read_mark(host[1], backend.magic) is None
    want = np.empty(SPEC.input_shape, np.float32)
    cpu.run(bad, want)
    np.testing.assert_array_equal(host[1], want)
    assert not backend.device[1].any()


def test_images_that_wait_together_are_decoded_in_one_call():
    calls: list[int] = []
    gate = threading.Event()

    def decode_many(datas):
        calls.append(len(datas))
        if len(calls) == 1:
            gate.wait(5)  # the first call holds: the others queue up behind it
        return [RuntimeError("bad jpeg") if d == b"bad" else d.upper() for d in datas]

    dec = BatchedDecoder(decode_many)
    results: dict[int, object] = {}

    def one(i: int, data: bytes) -> None:
        try:
            results[i] = dec.decode(data)
        except RuntimeError as e:
            results[i] = e

    first = threading.Thread(target=one, args=(0, b"a"))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    rest = [
        threading.Thread(target=one, args=(i, d)) for i, d in enumerate([b"b", b"bad", b"c"], 1)
    ]
    for t in rest:
        t.start()
    while len(dec._pending) < 3:
        threading.Event().wait(0.01)
    gate.set()
    for t in [first, *rest]:
        t.join(5)
    assert calls == [1, 3] and (dec.calls, dec.images) == (2, 4)
    assert results[0] == b"A" and results[1] == b"B" and results[3] == b"C"
    assert isinstance(results[2], RuntimeError)  # one bad image fails alone


def test_a_failed_batch_call_retries_each_image_alone():
    def decode_many(datas):
        if len(datas) > 1 or datas[0] == b"bad":
            raise RuntimeError("batch refused")
        return [datas[0] * 2]

    dec = BatchedDecoder(decode_many)
    items = [[b"x", threading.Event(), None], [b"bad", threading.Event(), None]]
    dec._pending = list(items)
    dec._leader = True
    dec._lead()
    assert dec._pending == [] and not dec._leader
    assert items[0][2] == b"xx" and isinstance(items[1][2], RuntimeError)
    assert all(it[1].is_set() for it in items)


def _has_cuda_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401

        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(
    not _has_cuda_torchvision(), reason="needs an NVIDIA GPU, CUDA torch and torchvision"
)
def test_nvjpeg_through_torchvision_matches_the_cpu_path(data_dir):
    from cvserve.images.gpu_torch import TorchvisionBackend
    from cvserve.runtime.cuda import DeviceBuffers
    from cvserve.runtime.torchrt import TorchOps

    buffers = DeviceBuffers(0, 2, SPEC.input_shape, "float32", ops=TorchOps(torch, 0))
    backend = TorchvisionBackend(buffers, 0)
    pre = GpuPreprocessor(SPEC, backend, Preprocessor(SPEC))
    host = np.zeros((2, *SPEC.input_shape), np.float32)
    for path in _photos(data_dir)[:6]:
        data = path.read_bytes()
        ref = np.empty(SPEC.input_shape, np.float32)
        try:
            Preprocessor(SPEC, decoder="pil").run(data, ref)
        except Exception:
            continue
        pre.run(data, host, 1)
        if read_mark(host[1], backend.magic) is None:
            continue
        got = buffers.for_host(host)[1].cpu().numpy()
        assert _psnr(got, ref, SPEC) >= 40.0, path
    assert pre.counts.gpu >= 1
