"""Preprocessor: image bytes to one model-input slot, timing decode, resize and normalize."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cvserve.images.decode import BACKENDS, DEFAULT_BACKEND, DEFAULT_MAX_PIXELS, decode
from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import (
    fused_supported,
    normalize_into,
    resample_into,
    resize_crop,
    resized_size,
)

DECODERS = BACKENDS
#: Reduced decoders keep at least this multiple of the resize target, so the final resize
#: still antialiases: measured on the shared photos, a margin of 1.0 puts the worst model
#: input at 28.7 dB PSNR against the full-decode reference, 1.5 at 37.7 dB
#: (benchmarks/preprocess.py), for ~2 ms more per medium image. Measured again with the
#: fused resize: 1.25 puts demo15 at 31.0 dB (it decodes at 1/4 instead of 1/2).
DECODE_MARGIN = 1.5
#: simplejpeg with its fast IDCT and chroma upsampling (see decode(fast=...)): off.
FAST_DECODE = False


@dataclass
class ImageMeta:
    """What postprocessing needs to know about the image a slot came from."""

    orig_size: tuple[int, int]  # upright (width, height)
    format: str
    reduced: int  # DCT-domain reduction used while decoding
    stages: dict[str, float] = field(default_factory=dict)  # decode/resize/normalize seconds
    started: float = 0.0  # perf_counter when a pool thread picked the image up
    finished: float = 0.0
    decoded_size: tuple[int, int] = (0, 0)  # (width, height) decoded, stored orientation


class Preprocessor:
    """Decode, resize/crop and normalize one image straight into a batch slot.

    ``decoder='simplejpeg'`` (the default; or ``'pil-reduced'``, ``'opencv'``) lets
    libjpeg-turbo decode JPEGs at 1/2, 1/4 or 1/8 scale when the model needs fewer pixels;
    ``'pil'`` always decodes at full resolution and resizes with Pillow: the path
    HuggingFace's image processors and timm take, so answers equal the library's. With the
    others, where the spec allows (:func:`~cvserve.images.transforms.fused_supported`) the
    resize, crop and normalize are one pass from the decoder's array into the slot
    (``fused``, JPEGs); else Pillow resizes.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        *,
        decoder: str = DEFAULT_BACKEND,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        margin: float = DECODE_MARGIN,
        fused: bool = True,
        fast_decode: bool = FAST_DECODE,
    ) -> None:
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
        self.spec = spec
        self.decoder = decoder
        self.max_pixels = max_pixels
        self.margin = margin
        self.fast_decode = fast_decode
        # The fused kernel compiles (or loads from numba's disk cache, ~0.1 s) on first use
        # of each tap count, not here: a server or test loads only the ones its images use.
        # Importing numba (~0.5 s) is paid here, when the model loads.
        self.fused = fused and decoder != "pil" and fused_supported(spec)
        if self.fused:
            import cvserve.images._resample_kernels  # noqa: F401

    def _min_decode_size(self, orig: tuple[int, int]) -> tuple[int, int]:
        # The resize step must still be a downscale (or identity): keep at least the
        # resized size, so the crop loses no detail the model would have seen. OpenCV's
        # linear resize samples the source without antialiasing: only the full image gives
        # the pixels it would pick.
        if self.spec.interpolation == "cv2_linear":
            return orig
        w, h = resized_size(*orig, self.spec)
        return int(w * self.margin), int(h * self.margin)

    def run(self, data: bytes, out: np.ndarray) -> ImageMeta:
        """Preprocess ``data`` into ``out`` (shape ``spec.input_shape``, dtype ``spec.dtype``).

        Raises :class:`cvserve.images.decode.ImageError` subclasses for bad input.
        """
        t0 = time.perf_counter()
        spec = self.spec
        dec = decode(
            data,
            max_pixels=self.max_pixels,
            min_size=self._min_decode_size,
            backend=self.decoder,
            as_pixels=self.fused,
            fast=self.fast_decode,
        )
        t1 = time.perf_counter()
        # Other formats stay on Pillow's resize: their pixels would have to be copied out
        # of Pillow's storage into a fresh array, and on a 2.2 MP PNG the page faults of
        # that copy (13 ms of system time) cost more than the fused pass saves.
        if (
            self.fused
            and (dec.pixels is not None or dec.format == "JPEG")
            and resample_into(dec.rgb(), dec.orig_size, spec, out)
        ):
            t2 = t3 = time.perf_counter()  # one pass: resize and normalize together
        else:
            im = dec.image if dec.image is not None else Image.fromarray(dec.rgb())
            pixels = np.asarray(resize_crop(im, dec.orig_size, spec))
            t2 = time.perf_counter()
            normalize_into(pixels, out, spec)
            t3 = time.perf_counter()
        return ImageMeta(
            orig_size=dec.orig_size,
            format=dec.format,
            reduced=dec.reduced,
            stages={"decode": t1 - t0, "resize": t2 - t1, "normalize": t3 - t2},
            started=t0,
            finished=t3,
            decoded_size=dec.decoded_size,
        )


def decode_floor(data: bytes, decoded_size: tuple[int, int]) -> np.ndarray:
    """The floor of preprocessing a JPEG: libjpeg-turbo alone (through simplejpeg) decoding
    it to RGB at the scale that gives ``decoded_size`` (what :meth:`Preprocessor.run`
    decoded, ``ImageMeta.decoded_size``), nothing else. For benchmarks and the study."""
    import simplejpeg

    w, h = decoded_size
    return simplejpeg.decode_jpeg(data, "RGB", min_width=w, min_height=h)
