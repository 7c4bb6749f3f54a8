"""Geometry and pixel encoding: resize + crop in one resampling pass, normalize into a slot.

Geometry follows HuggingFace image processors exactly (shortest edge to ``S`` with the long
side truncated, then a center crop with ``(size - crop) // 2`` offsets), so a model served
here sees what it saw in training.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cvserve.images.spec import PreprocessSpec

#: PreprocessSpec interpolation names -> Pillow's resampling filters.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

Box = tuple[float, float, float, float]


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) of the full image after the resize step, before any crop."""
    if spec.resize_mode == "direct":
        return spec.width, spec.height
    if spec.resize_mode in ("letterbox", "letterbox_center"):
        scale = min(spec.width / width, spec.height / height)
        return (
            min(spec.width, max(1, round(width * scale))),
            min(spec.height, max(1, round(height * scale))),
        )
    s = spec.resize_shortest
    assert s is not None
    if width <= height:
        return s, int(s * height / width)
    return int(s * width / height), s


def crop_box(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """The crop (left, top, right, bottom) in resized-image pixels.

    For ``letterbox`` this is ``(0, 0, width, height)`` of the model input: the resized
    image sits at the top-left and the crop reaches past its bottom/right (the padding);
    for ``letterbox_center`` it starts at minus the left/top padding."""
    rw, rh = resized_size(width, height, spec)
    if spec.resize_mode == "letterbox":
        return 0, 0, spec.width, spec.height
    if spec.resize_mode == "letterbox_center":  # Ultralytics: round(d / 2 - 0.1) before
        left = -round((spec.width - rw) / 2 - 0.1)
        top = -round((spec.height - rh) / 2 - 0.1)
        return left, top, left + spec.width, top + spec.height
    if spec.resize_mode == "direct":
        return 0, 0, rw, rh
    if spec.extra.get("crop_offset") == "round":  # torchvision's CenterCrop (timm)
        top = int(round((rh - spec.height) / 2.0))
        left = int(round((rw - spec.width) / 2.0))
    else:  # HuggingFace's center_crop
        top = (rh - spec.height) // 2
        left = (rw - spec.width) // 2
    return left, top, left + spec.width, top + spec.height


def source_box(orig: tuple[int, int], have: tuple[int, int], spec: PreprocessSpec) -> Box:
    """The region of an image of size ``have`` (the original ``orig``, possibly decoded at
    reduced scale) that maps onto the model input, in ``have``'s pixel coordinates."""
    rw, rh = resized_size(*orig, spec)
    left, top, right, bottom = crop_box(*orig, spec)
    sx = have[0] / rw
    sy = have[1] / rh
    return left * sx, top * sy, right * sx, bottom * sy


def resize_crop(im: Image.Image, orig: tuple[int, int], spec: PreprocessSpec) -> Image.Image:
    """Resize and crop in one resampling pass (Pillow's ``box``): only the pixels that end
    up in the model input are computed. Crops larger than the image are zero-padded."""
    if spec.interpolation == "cv2_linear":
        return _resize_cv2(im, orig, spec)
    box = source_box(orig, im.size, spec)
    x0, y0, x1, y1 = box
    if x0 >= 0 and y0 >= 0 and x1 <= im.size[0] + 1e-6 and y1 <= im.size[1] + 1e-6:
        box = (x0, y0, min(x1, im.size[0]), min(y1, im.size[1]))
        return im.resize((spec.width, spec.height), RESAMPLE[spec.interpolation], box=box)
    # The crop reaches outside the resized image (crop larger than the resize): resize the
    # whole image, then paste it centred on a black canvas, as HF's center_crop pads.
    rw, rh = resized_size(*orig, spec)
    full = im.resize((rw, rh), RESAMPLE[spec.interpolation])
    left, top, _, _ = crop_box(*orig, spec)
    canvas = Image.new("RGB", (spec.width, spec.height), _pad_fill(spec))
    canvas.paste(full, (-left, -top))
    return canvas


def _resize_cv2(im: Image.Image, orig: tuple[int, int], spec: PreprocessSpec) -> Image.Image:
    """OpenCV's ``INTER_LINEAR`` resize of the whole image, then the crop or padding, as
    ``cv2.resize`` + ``cv2.copyMakeBorder`` do in Ultralytics' letterbox."""
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv-python is in the ocr and zoo extras
        raise RuntimeError(
            "interpolation 'cv2_linear' needs opencv-python (pip install opencv-python)"
        ) from None
    rw, rh = resized_size(*orig, spec)
    arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    if arr.shape[1] != rw or arr.shape[0] != rh:
        arr = cv2.resize(arr, (rw, rh), interpolation=cv2.INTER_LINEAR)
    left, top, _, _ = crop_box(*orig, spec)
    out = np.empty((spec.height, spec.width, 3), np.uint8)
    out[...] = _pad_fill(spec)
    # The part of the resized image inside the crop, at its place in the output.
    sx0, sy0 = max(0, left), max(0, top)
    dx0, dy0 = max(0, -left), max(0, -top)
    w = min(rw - sx0, spec.width - dx0)
    h = min(rh - sy0, spec.height - dy0)
    if w > 0 and h > 0:
        out[dy0 : dy0 + h, dx0 : dx0 + w] = arr[sy0 : sy0 + h, sx0 : sx0 + w]
    return Image.fromarray(out)


def fused_supported(spec: PreprocessSpec) -> bool:
    """Whether :func:`resample_into` can take this spec (else: :func:`resize_crop` and
    :func:`normalize_into`): a filter other than nearest, no letterbox."""
    from cvserve.images._resample_kernels import FILTERS

    return spec.interpolation in FILTERS and spec.resize_mode in ("shortest_edge_crop", "direct")


def resample_into(
    pixels: np.ndarray, orig: tuple[int, int], spec: PreprocessSpec, out: np.ndarray
) -> bool:
    """Resize, crop and normalize ``pixels`` (HxWx3 uint8 RGB, C-contiguous: the original
    ``orig`` or a reduced decode of it) straight into the slot ``out`` in one pass: the
    same filter as :func:`resize_crop` (Pillow's weights, over only the crop's source
    region) computed in float32 without the 8-bit rounding between Pillow's two passes,
    then :func:`normalize_into`'s arithmetic (a uint8 slot: the pixels, rounded as
    Pillow's are). False (``out`` untouched) where it does not
    apply: see :func:`fused_supported`, and a crop that reaches past the image."""
    from cvserve.images import _resample_kernels as k

    if not fused_supported(spec) or pixels.ndim != 3 or pixels.shape[2] != 3:
        return False
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = source_box(orig, (w, h), spec)
    if x0 < 0 or y0 < 0 or x1 > w + 1e-6 or y1 > h + 1e-6:
        return False
    fid, support = k.FILTERS[spec.interpolation]
    ix, wx = k.coefficients(w, x0, min(x1, w), spec.width, fid, support, True)
    iy, wy = k.coefficients(h, y0, min(y1, h), spec.height, fid, support, False)
    if spec.dtype == "uint8":  # the raw pixels: the model normalizes itself
        scale, shift = _ONES, _ZEROS
    else:
        std = np.asarray(spec.std, dtype=np.float64)
        scale = (spec.rescale / std).astype(np.float32)
        shift = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32)
    chan = _BGR if spec.channel_order == "BGR" else _RGB
    view = out if spec.layout == "NCHW" else out.transpose(2, 0, 1)
    taps = wx.shape[1] if wx.shape[1] in k.TAP_BUCKETS else 0
    k.resample_normalize(
        np.ascontiguousarray(pixels), ix, wx, iy, wy, scale, shift, chan, view, (0,) * taps,
        spec.dtype == "uint8",
    )  # fmt: skip
    return True


_ONES = np.ones(3, np.float32)
_ZEROS = np.zeros(3, np.float32)
_RGB = np.array([0, 1, 2], np.int64)
_BGR = np.array([2, 1, 0], np.int64)


def _pad_fill(spec: PreprocessSpec) -> tuple[int, int, int]:
    """Canvas colour for padding: ``extra["pad_value"]`` for letterboxes, else black."""
    if spec.resize_mode not in ("letterbox", "letterbox_center"):
        return (0, 0, 0)
    pad = spec.extra.get("pad_value", 0)
    if isinstance(pad, int | float):
        return (int(pad),) * 3  # type: ignore[return-value]
    r, g, b = (int(v) for v in pad)
    return (r, g, b)


def normalize_into(pixels: np.ndarray, out: np.ndarray, spec: PreprocessSpec) -> None:
    """Write ``(pixels * rescale - mean) / std`` (or the raw uint8 pixels) into ``out``.

    ``pixels`` is HxWx3 uint8 RGB; ``out`` has ``spec.input_shape`` and ``spec.dtype``.
    One fused multiply-add per pixel, straight into the batch slot.
    """
    src = pixels[..., ::-1] if spec.channel_order == "BGR" else pixels
    if spec.layout == "NCHW":
        src = src.transpose(2, 0, 1)
        bshape: tuple[int, ...] = (3, 1, 1)
    else:
        bshape = (1, 1, 3)
    if spec.dtype == "uint8":
        np.copyto(out, src)
        return
    std = np.asarray(spec.std, dtype=np.float64)
    scale = (spec.rescale / std).astype(np.float32).reshape(bshape)
    shift = (-np.asarray(spec.mean, dtype=np.float64) / std).astype(np.float32).reshape(bshape)
    np.multiply(src, scale, out=out)
    out += shift
