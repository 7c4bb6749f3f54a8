"""GPU preprocessing: per-image routing and CPU fall back, the device geometry (the same
code on NumPy against the CPU path), row marks, the ``auto`` policy; nvJPEG on a GPU only."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from cvserve.images.gpu import (
    AutoPolicy,
    GpuPreprocessor,
    LinearCost,
    device_geometry,
    jpeg_header,
    resize_normalize,
    resize_weights,
    route,
)
from cvserve.images.preprocess import Preprocessor
from cvserve.images.spec import PreprocessSpec
from cvserve.runtime.device_rows import mark_row, read_mark

MEDIUM = "images/medium/demo01.jpg"
LARGE = "images/large/jolla.jpg"


def _read(data_dir, rel: str) -> bytes:
    return (data_dir / rel).read_bytes()


def _png(data_dir) -> bytes:
    im = Image.open(io.BytesIO(_read(data_dir, MEDIUM))).convert("RGB").resize((320, 240))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _psnr(a: np.ndarray, b: np.ndarray, spec: PreprocessSpec) -> float:
    """PSNR in [0, 1] pixel units of two normalized NCHW float inputs."""
    std = np.asarray(spec.std, dtype=np.float64).reshape(3, 1, 1)
    err = (a.astype(np.float64) - b.astype(np.float64)) * std
    return float(10 * np.log10(1.0 / max(np.mean(err**2), 1e-20)))


class NumpyBackend:
    """The device, played by NumPy: decodes with Pillow unless told to fail."""

    xp = np

    def __init__(self, rows: int, spec: PreprocessSpec, fail: set[bytes] = frozenset()):
        self.magic = os.urandom(8)
        self.fail = fail
        self.device = np.zeros((rows, *spec.input_shape), dtype=spec.dtype)
        self.decoded = 0

    def decode(self, data: bytes):
        if data in self.fail:
            raise RuntimeError("nvjpeg: bitstream not supported")
        self.decoded += 1
        return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))

    def row(self, host_buffer, index):
        return self.device[index]

    def synchronize(self):
        pass

    def activate(self):
        return contextlib.nullcontext()


SPEC = PreprocessSpec(224, 224, resize_shortest=256)


# --- what goes where ---------------------------------------------------------------------------
def test_jpeg_header_reads_the_declared_size(data_dir):
    for rel in (MEDIUM, LARGE):
        head = jpeg_header(_read(data_dir, rel))
        assert head is not None and head.precision == 8
        assert (head.width, head.height) == Image.open(data_dir / rel).size
    assert jpeg_header(_png(data_dir)) is None
    assert jpeg_header(b"\xff\xd8\xff") is None  # truncated: no frame header


def test_route_sends_jpegs_to_the_device_and_the_rest_to_the_cpu(data_dir):
    jpeg = _read(data_dir, MEDIUM)
    assert route(jpeg, "gpu")[:2] == ("gpu", "jpeg")
    assert route(jpeg, "gpu")[2] == 2048 * 1362
    assert route(jpeg, "cpu")[0] == "cpu"
    assert route(_png(data_dir), "gpu")[:2] == ("cpu", "format png")
    assert route(b"not an image", "gpu")[:2] == ("cpu", "format unknown")
    # a 12-bit or lossless JPEG is not nvJPEG's: the CPU path takes (or refuses) it
    twelve = bytearray(jpeg)
    head = jpeg_header(jpeg)
    at = bytes(twelve).find(bytes([0xFF, head.sof]))
    twelve[at + 4] = 12
    assert route(bytes(twelve), "gpu")[0] == "cpu"


# --- geometry: the device's arithmetic, run on NumPy ---------------------------------------------
@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "lanczos", "box", "hamming"])
def test_resize_weights_are_normalized_and_local(interp):
    w = resize_weights(1000, 224, 16.0, 984.0, interp)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)
    assert w.shape == (224, 1000)
    # each output pixel reads only a window around its centre (the filter's support)
    nz = [np.flatnonzero(r) for r in w]
    assert max(r[-1] - r[0] for r in nz) < 40


@pytest.mark.parametrize("rel", [MEDIUM, LARGE])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_device_geometry_matches_the_cpu_path(data_dir, rel, interp):
    """HF geometry, the same bar as the CPU path's reduced decoders: PSNR against the
    full-decode CPU reference (measured 59-60 dB)."""
    spec = SPEC.replace(interpolation=interp)
    data = _read(data_dir, rel)
    ref = np.empty(spec.input_shape, np.float32)
    Preprocessor(spec, decoder="pil").run(data, ref)
    pixels = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    geom = device_geometry((pixels.shape[1], pixels.shape[0]), spec)
    out = np.empty_like(ref)
    resize_normalize(np, pixels, geom, spec, out)
    assert _psnr(out, ref, spec) > 50.0


def test_uint8_nhwc_bgr_layouts(data_dir):
    spec = SPEC.replace(dtype="uint8", layout="NHWC", channel_order="BGR")
    data = _read(data_dir, MEDIUM)
    ref = np.empty(spec.input_shape, np.uint8)
    Preprocessor(spec, decoder="pil").run(data, ref)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = np.empty_like(ref)
    resize_normalize(np, pixels, device_geometry(pixels.shape[1::-1], spec), spec, out)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.1


def test_geometry_the_device_does_not_do_is_left_to_the_cpu():
    assert device_geometry((640, 480), SPEC.replace(resize_mode="letterbox")) is None
    assert device_geometry((640, 480), SPEC.replace(interpolation="nearest")) is None
    # a crop larger than the resize pads on the CPU path
    assert device_geometry((640, 480), SPEC.replace(resize_shortest=200)) is None
    assert device_geometry((640, 480), SPEC) is not None


# --- rows on the device ---------------------------------------------------------------------------
def test_marks_travel_with_rows_and_any_host_write_erases_them():
    magic = os.urandom(8)
    buf = np.zeros((4, *SPEC.input_shape), np.float32)
    mark_row(buf[2], 2, magic)
    assert read_mark(buf[2], magic) == 2 and read_mark(buf[0], magic) is None
    assert read_mark(buf[2], os.urandom(8)) is None  # another process's mark means nothing
    buf[0] = buf[2]  # the batcher squeezing a hole out
    assert read_mark(buf[0], magic) == 2
    buf[2][...] = 0.5  # the CPU path writing the row
    assert read_mark(buf[2], magic) is None


# --- the preprocessor: per image, never per batch ---------------------------------------------------
def test_each_image_goes_its_own_way_and_failures_fall_back_alone(data_dir):
    good = _read(data_dir, MEDIUM)
    bad_for_device = _read(data_dir, LARGE)  # a JPEG the "device" refuses
    png = _png(data_dir)
    backend = NumpyBackend(4, SPEC, fail={bad_for_device})
    cpu = Preprocessor(SPEC)
    pre = GpuPreprocessor(SPEC, backend, cpu)
    host = np.zeros((4, *SPEC.input_shape), np.float32)
    metas = [pre.run(d, host, i) for i, d in enumerate([good, png, bad_for_device])]

    c = pre.counts
    assert (c.gpu, c.cpu, c.fallback) == (1, 1, 1)
    assert c.reasons == {"format png": 1, "device decode failed": 1}
    # row 0: pixels on the device, a mark on the host row
    assert read_mark(host[0], backend.magic) == 0
    ref = np.empty(SPEC.input_shape, np.float32)
    Preprocessor(SPEC, decoder="pil").run(good, ref)
    assert _psnr(backend.device[0], ref, SPEC) > 50.0
    assert metas[0].orig_size == (2048, 1362) and metas[0].format == "JPEG"
    # rows 1 and 2: exactly the CPU path's bytes, no mark, nothing on the device
    for i, data in ((1, png), (2, bad_for_device)):
        want = np.empty(SPEC.input_shape, np.float32)
        cpu.run(data, want)
        np.testing.assert_array_equal(host[i], want)
        assert read_mark(host[i], backend.magic) is None
        assert not backend.device[i].any()
    upright = ImageOps.exif_transpose(Image.open(data_dir / LARGE)).size
    assert metas[2].orig_size == upright


def test_undecodable_bytes_still_get_the_cpu_paths_error(data_dir):
    from cvserve.images.decode import ImageError

    truncated = _read(data_dir, MEDIUM)[:2000]
    backend = NumpyBackend(1, SPEC, fail={truncated})
    pre = GpuPreprocessor(SPEC, backend, Preprocessor(SPEC))
    with pytest.raises(ImageError):
        pre.run(truncated, np.zeros((1, *SPEC.input_shape), np.float32), 0)
    assert pre.counts.fallback == 1


def test_a_truncated_jpeg_the_device_would_pad_gets_the_cpu_paths_400():
    from cvserve.images.decode import UndecodableImage, jpeg_header

    small = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(small, "JPEG")
    liar = bytearray(small.getvalue())  # its header rewritten to declare 2000x2000
    at = bytes(liar).find(bytes([0xFF, jpeg_header(bytes(liar)).sof]))
    liar[at + 5 : at + 9] = (2000).to_bytes(2, "big") * 2
    liar = bytes(liar)
    backend = NumpyBackend(1, SPEC)  # decodes it, padding the missing blocks as nvJPEG does
    pre = GpuPreprocessor(SPEC, backend, Preprocessor(SPEC))
    with pytest.raises(UndecodableImage, match="truncated image"):
        pre.run(liar, np.zeros((1, *SPEC.input_shape), np.float32), 0)
    assert backend.decoded == 1 and pre.counts.gpu == 0 and pre.counts.fallback == 1


# --- auto -----------------------------------------------------------------------------------------
def test_auto_sends_small_images_to_the_cpu_and_large_ones_to_the_device():
    cpu, gpu = LinearCost(0.5e-3, 6e-3), LinearCost(1.5e-3, 0.3e-3)
    # break-even at 1e-3 s / 5.7e-3 s/MP ~ 0.175 MP
    assert AutoPolicy.choose(100_000, cpu, gpu) == "cpu"
    assert AutoPolicy.choose(2_000_000, cpu, gpu) == "gpu"
    # a busy device sends even large images to idle cores, and the reverse
    assert AutoPolicy.choose(2_000_000, cpu, gpu, gpu_queued_s=0.05) == "cpu"
    assert AutoPolicy.choose(100_000, cpu, gpu, cpu_queued_s=0.04, cpu_threads=4) == "gpu"


def test_auto_follows_measured_costs():
    policy = AutoPolicy(LinearCost(0.5e-3, 6e-3), LinearCost(1.5e-3, 0.3e-3), alpha=0.2)
    assert policy.decide(2_000_000) == "gpu"
    policy.done("gpu", 2_000_000, None)  # a failed attempt teaches nothing
    assert policy.costs["gpu"] == LinearCost(1.5e-3, 0.3e-3)
    # the device turns out slow: 20 ms + 10 ms/MP, measured over several sizes
    for _ in range(10):
        for mp in (0.5, 1.0, 3.0):
            policy.done("gpu", int(mp * 1e6), 0.020 + 0.010 * mp, estimated=False)
    g = policy.costs["gpu"]
    assert g.fixed_s == pytest.approx(0.020, rel=1e-3) and g.per_mpix_s == pytest.approx(0.010)
    assert policy.decide(2_000_000) == "cpu"


def test_auto_routes_through_the_policy(data_dir):
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(small, format="JPEG")
    policy = AutoPolicy(LinearCost(0.5e-3, 6e-3), LinearCost(1.5e-3, 0.3e-3))
    assert route(small.getvalue(), "auto", policy)[:2] == ("cpu", "policy")
    assert route(_read(data_dir, LARGE), "auto", policy)[:2] == ("gpu", "policy")


# --- on a GPU ----------------------------------------------------------------------------------------
def _has_gpu() -> bool:
    try:
        import cupy
        from nvidia import nvimgcodec  # noqa: F401

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(
    not _has_gpu(),
    reason="needs an NVIDIA GPU with nvImageCodec and CuPy (pip install 'cvserve[gpu]')",
)
@pytest.mark.parametrize("rel", [MEDIUM, LARGE])
def test_nvjpeg_path_matches_the_cpu_path(data_dir, rel):
    from cvserve.images.gpu import NvImageCodecBackend
    from cvserve.runtime.cuda import DeviceBuffers

    backend = NvImageCodecBackend(DeviceBuffers(0, 2, SPEC.input_shape, "float32"), 0)
    pre = GpuPreprocessor(SPEC, backend, Preprocessor(SPEC))
    host = np.zeros((2, *SPEC.input_shape), np.float32)
    data = _read(data_dir, rel)
    pre.run(data, host, 1)
    assert pre.counts.gpu == 1, pre.counts
    got = backend.buffers.for_host(host)[1].get()
    ref = np.empty(SPEC.input_shape, np.float32)
    Preprocessor(SPEC, decoder="pil").run(data, ref)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two
    assert _psnr(got, ref, SPEC) > 35.0
