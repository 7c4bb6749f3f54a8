"""Geometry and normalization against independent float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, normalize_into, resize_crop, resized_size


def _hf_resized(width: int, height: int, shortest: int) -> tuple[int, int]:
    # transformers.image_transforms.get_resize_output_image_size, default_to_square=False
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (2047, 1362), (224, 224), (100, 3000), (225, 224), (33, 7)]
)
def test_geometry_matches_huggingface(size):
    spec = PreprocessSpec(height=224, width=224, resize_shortest=256)
    assert resized_size(*size, spec) == _hf_resized(*size, 256)
    rw, rh = _hf_resized(*size, 256)
    left, top = (rw - 224) // 2, (rh - 224) // 2  # HF center_crop offsets
    assert crop_box(*size, spec) == (left, top, left + 224, top + 224)
    direct = spec.replace(resize_mode="direct")
    assert resized_size(*size, direct) == (224, 224)
    assert crop_box(*size, direct) == (0, 0, 224, 224)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_fused_resize_crop_equals_resize_then_crop(data_dir, interpolation):
    spec = PreprocessSpec(height=224, width=224, resize_shortest=256, interpolation=interpolation)
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    for path in sorted((data_dir / "images" / "small").glob("*.jpg"))[:4]:
        im = Image.open(path).convert("RGB")
        fused = np.asarray(resize_crop(im, im.size, spec)).astype(int)
        full = im.resize(resized_size(*im.size, spec), resample[interpolation])
        ref = np.asarray(full.crop(crop_box(*im.size, spec))).astype(int)
        assert fused.shape == ref.shape == (224, 224, 3)
        diff = np.abs(fused - ref)
        # One resampling pass over the crop region vs resampling everything then cropping:
        # the same filter taps, rounding may differ by one level in a few pixels.
        assert diff.max() <= 1
        assert (diff > 0).mean() < 0.005


def test_crop_larger_than_image_is_zero_padded():
    spec = PreprocessSpec(height=32, width=32, resize_shortest=16)  # crop > resize
    im = Image.new("RGB", (20, 10), (200, 100, 50))
    out = np.asarray(resize_crop(im, im.size, spec))
    assert out.shape == (32, 32, 3)
    assert (out[0, 0] == 0).all()  # padding
    assert (out[16, 16] == (200, 100, 50)).all()  # image, centred


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_normalize_equals_float64_reference(layout, order):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)
    spec = PreprocessSpec(
        height=48, width=40, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.7),
        layout=layout, channel_order=order,
    )  # fmt: skip
    out = np.full(spec.input_shape, np.nan, dtype=np.float32)
    normalize_into(pixels, out, spec)
    ref = pixels.astype(np.float64)
    if order == "BGR":
        ref = ref[..., ::-1]
    mean = np.array(spec.mean if order == "RGB" else spec.mean)
    std = np.array(spec.std)
    ref = (ref / 255.0 - mean) / std
    if layout == "NCHW":
        ref = ref.transpose(2, 0, 1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_normalize_uint8_passes_pixels_through():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    spec = PreprocessSpec(height=8, width=8, dtype="uint8")
    out = np.zeros(spec.input_shape, np.uint8)
    normalize_into(pixels, out, spec)
    assert (out == pixels.transpose(2, 0, 1)).all()
