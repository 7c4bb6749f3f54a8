"""Bytes to RGB pixels: format sniffing, size limits before any pixel is allocated,
reduced-scale JPEG decoding, EXIF orientation and colour-mode conversion.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cvserve.errors import RequestError
from cvserve.images.budget import claim

log = logging.getLogger(__name__)

#: Default ceiling on decoded pixels (width x height): a 64-megapixel image.
DEFAULT_MAX_PIXELS = 64_000_000

# Formats we decode; anything else is a 415. Names are Pillow's format names.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")  # MPO opens as JPEG
#: Formats decoded where the installed libraries can: AVIF by Pillow's own plugin (wheels
#: since 11.3), HEIF/HEIC by pillow-heif (the ``heic`` extra).
OPTIONAL_FORMATS = ("AVIF", "HEIF")
#: ISOBMFF ``ftyp`` brands (major or compatible) of each still-image format.
_AVIF_BRANDS = frozenset((b"avif", b"avis"))
_HEIC_BRANDS = frozenset((b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"))

# EXIF orientation values whose transpose swaps width and height.
_SWAPS_AXES = {5, 6, 7, 8}


class ImageError(RequestError):
    """Base of every error a client's image can cause; ``status`` is its HTTP status."""

    status = 400
    kind = "bad_image"


class UndecodableImage(ImageError):
    """The bytes claim to be an image but cannot be decoded (corrupt, truncated, empty)."""

    status = 400
    kind = "undecodable_image"


class UnsupportedImageType(ImageError):
    """The bytes are not an image format cvserve decodes."""

    status = 415
    kind = "unsupported_media_type"


class ImageTooLarge(ImageError):
    """The image declares more pixels than the limit (refused before decoding)."""

    status = 413
    kind = "image_too_large"


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes, or None if unknown."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return _isobmff_format(data)
    return None


def _isobmff_format(data: bytes) -> str | None:
    """AVIF or HEIF from an ``ftyp`` box's brands (an MP4 video is neither: None)."""
    size = int.from_bytes(data[:4], "big")
    box = data[8 : min(max(size, 16), 256)]
    brands = {box[i : i + 4] for i in range(0, len(box) - 3, 4) if i != 4}  # i=4: version
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIC_BRANDS:
        return "HEIF"
    return None


def decodable_formats() -> tuple[str, ...]:
    """Pillow format names this installation decodes: the core ones, and AVIF and HEIF
    where their decoders are installed."""
    return SUPPORTED_FORMATS + tuple(f for f in OPTIONAL_FORMATS if _optional_decoder(f) is None)


def _optional_decoder(fmt: str) -> str | None:
    """None when ``fmt`` can be decoded here, else what to install for it."""
    if fmt == "AVIF":
        from PIL import features

        return None if features.check("avif") else "a Pillow built with AVIF (pillow>=11.3)"
    try:
        import pillow_heif
    except ImportError:
        return "the heic extra: pip install 'cvserve[heic]'"
    _register_heif(pillow_heif)
    return None


_heif_registered = False


def _register_heif(pillow_heif) -> None:
    global _heif_registered
    if not _heif_registered:
        pillow_heif.register_heif_opener()
        _heif_registered = True


#: JPEG frame headers (SOF markers): every coding process, Huffman and arithmetic.
JPEG_SOF = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


#: Frames whose scans refine the whole image (progressive, Huffman or arithmetic).
JPEG_PROGRESSIVE_SOF = (0xC2, 0xC6, 0xCA, 0xCE)
#: Arithmetic-coded frames: no floor on their coded size (a flat image codes to ~nothing).
_JPEG_ARITHMETIC_SOF = (0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
#: Huffman-coded frames and the fewest bits every 8x8 block costs in them: a sequential
#: block codes at least its DC difference and an end-of-block (1 bit each, at best); a
#: progressive file's DC scan codes at least 1 bit per block.
_MIN_BITS_PER_BLOCK = {0xC0: 2, 0xC1: 2, 0xC2: 1}


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's frame header declares: size, precision, coding (SOF marker) and each
    component's sampling factors ``(h, v)``."""

    width: int
    height: int
    precision: int
    sof: int
    sampling: tuple[tuple[int, int], ...] = ()

    @property
    def progressive(self) -> bool:
        return self.sof in JPEG_PROGRESSIVE_SOF

    def blocks(self, *, padded: bool = False) -> int:
        """8x8 DCT blocks of every component at full size; ``padded``: rounded up to whole
        MCUs, as libjpeg allocates its coefficient buffer."""
        sampling = self.sampling or ((1, 1),)
        hmax = max(h for h, _ in sampling)
        vmax = max(v for _, v in sampling)
        n = 0
        for h, v in sampling:
            bw = -(-self.width * h // (hmax * 8))
            bh = -(-self.height * v // (vmax * 8))
            if padded:
                bw, bh = -(-bw // h) * h, -(-bh // v) * v
            n += bw * bh
        return n

    def min_coded_bytes(self) -> int:
        """The fewest bytes of entropy-coded data a complete image of this size can have
        (0 where no floor is known, e.g. arithmetic coding)."""
        return self.blocks() * _MIN_BITS_PER_BLOCK.get(self.sof, 0) // 8


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The first frame header of a JPEG, read without decoding; None when there is none."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in JPEG_SOF:
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            comps = data[i + 10 : i + 10 + 3 * (data[i + 9] if i + 9 < n else 0)]
            sampling = tuple(
                (max(1, comps[k + 1] >> 4), max(1, comps[k + 1] & 15))
                for k in range(0, len(comps) - 2, 3)
            )
            return JpegHeader(w, h, data[i + 4], marker, sampling)
        i += 2 + seg_len
    return None


def jpeg_first_scan_components(data: bytes) -> int:
    """Components in a JPEG's first scan (its first SOS segment), 0 when there is none. A
    sequential JPEG whose first scan has fewer components than its frame codes them in
    several scans, which libjpeg decodes from a full-size coefficient buffer."""
    i, n = 2, len(data)
    while i + 4 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:
            return data[i + 4]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return 0


@dataclass
class Decoded:
    """An upright RGB image and what it took to get there: a Pillow image, or with
    ``decode(..., as_pixels=True)`` where the decoder made an array, ``pixels``."""

    image: Image.Image | None  # mode "RGB", EXIF orientation applied
    orig_size: tuple[int, int]  # (width, height) of the full-resolution upright image
    format: str
    reduced: int = 1  # DCT-domain reduction factor applied while decoding (1, 2, 4, 8)
    decoded_size: tuple[int, int] = (0, 0)  # (width, height) decoded, stored orientation
    pixels: np.ndarray | None = None  # HxWx3 uint8 RGB, upright (a view; may be strided)

    def rgb(self) -> np.ndarray:
        """The upright pixels as an HxWx3 uint8 array, whichever form they came in."""
        return self.pixels if self.pixels is not None else np.asarray(self.image)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str]:
    """Parse the header only: format, size and limit checks, no pixel decoding yet."""
    if not data:
        raise UndecodableImage("empty request body: expected image bytes")
    fmt = sniff_format(data)
    formats = decodable_formats()
    if fmt is None:
        raise UnsupportedImageType(
            f"unsupported image format (unknown); supported: {', '.join(formats)}",
            supported=list(formats),
        )
    if fmt in OPTIONAL_FORMATS and fmt not in formats:
        raise UnsupportedImageType(
            f"{fmt} images need {_optional_decoder(fmt)}; supported here: {', '.join(formats)}",
            supported=list(formats),
        )
    Image.init()  # registers every plugin named in SUPPORTED_FORMATS (idempotent)
    try:
        # No warnings.catch_warnings() here: it is not thread-safe. Pillow only warns about
        # sizes far above DEFAULT_MAX_PIXELS, which the check below refuses anyway.
        # AVIF and HEIF: only their plugin reads the bytes; like every format here, it reads
        # the header only, so the size check below runs before any pixel is decoded.
        only = (fmt,) if fmt in OPTIONAL_FORMATS else SUPPORTED_FORMATS
        im = Image.open(io.BytesIO(data), formats=only)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image declares too many pixels: {e}", max_pixels=max_pixels) from None
    except UnidentifiedImageError:
        head = jpeg_header(data) if fmt == "JPEG" else None
        if head is not None and head.precision != 8:
            raise UnsupportedImageType(
                f"{head.precision}-bit JPEG is not supported (8-bit only)"
            ) from None
        raise UndecodableImage(f"cannot decode {fmt} image: corrupt or truncated header") from None
    except ValueError as e:
        if "too large" in str(e):
            raise ImageTooLarge(f"image metadata too large: {e}") from None
        raise UndecodableImage(f"cannot decode {fmt} image: {e}") from None
    except OSError as e:
        raise UndecodableImage(f"cannot decode {fmt} image: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise UndecodableImage(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}",
            width=w,
            height=h,
            max_pixels=max_pixels,
        )
    if fmt == "JPEG":
        head = jpeg_header(data)
        floor = head.min_coded_bytes() if head is not None else 0
        if len(data) < floor:
            # libjpeg pads a stream that ends early (at an EOI marker) with grey blocks and
            # only warns; a file this short cannot hold the image its header declares.
            raise UndecodableImage(
                f"truncated image: a {head.width}x{head.height} JPEG needs at least {floor} "
                f"bytes of coded data, this file has {len(data)}",
                bytes=len(data),
                min_bytes=floor,
            )
    return im, fmt


def exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # corrupt EXIF must not fail the request
        return 1


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, scaling 16/32-bit samples instead of clipping."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        if mode == "I":
            # Pillow widens 16-bit PNG/TIFF greyscale to I; scale by the format's range.
            peak = 65535 if a.max(initial=0) > 255 else 255
        else:
            peak = 65535
        a8 = (a.astype(np.float32) * (255.0 / peak) + 0.5).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im)
        a8 = (a * (255.0 if a.max(initial=0) <= 1.0 else 1.0)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    # L, LA, P, PA, RGBA, CMYK (Adobe-inverted CMYK is handled by the JPEG plugin),
    # YCbCr, 1: Pillow's own conversion, as HF image processors and torchvision do.
    return im.convert("RGB")


#: How an image is turned into pixels. ``pil``: Pillow, full resolution. The others decode
#: JPEGs at reduced scale in the DCT domain (libjpeg-turbo in every case) when the caller
#: needs fewer pixels, and fall back to Pillow for other formats and for CMYK JPEGs.
#: ``simplejpeg`` (the default) calls libjpeg-turbo's own entry point straight into an
#: array; every reduced decoder uses the power-of-two scales (1/2, 1/4, 1/8): libjpeg-turbo's
#: M/8 scales (3/8, 5/8, 3/4, 7/8) have no SIMD IDCT, decode slower than the full-size
#: image, and keep less detail (28.7 dB on a shared photo; benchmarks/preprocess.py).
BACKENDS = ("pil", "pil-reduced", "simplejpeg", "opencv")
#: The default decoder (``Preprocessor``, ``--decoder``, a model's ``decoder``).
DEFAULT_BACKEND = "simplejpeg"

#: The upright transposes as numpy views, for decoders that make arrays.
_UPRIGHT_ARRAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}

# Pillow's exif_transpose table: orientation -> the transpose that shows the image upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
    backend: str = DEFAULT_BACKEND,
    as_pixels: bool = False,
    fast: bool = False,
) -> Decoded:
    """Decode ``data`` to an upright RGB image.

    ``min_size`` maps the upright original (width, height) to the smallest upright size the
    caller needs; with it (and a reduced ``backend``) a JPEG decodes at 1/2, 1/4 or 1/8
    scale in the DCT domain, as long as the result stays at least that big. ``as_pixels``:
    where the decoder makes an array (simplejpeg, OpenCV), return it as ``pixels`` instead
    of wrapping it in a Pillow image (one copy fewer). ``fast``: simplejpeg with
    libjpeg-turbo's fast integer IDCT and chroma upsampling (a few % faster, ~45 dB).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown decoder {backend!r}; choose from {', '.join(BACKENDS)}")
    im, fmt = open_image(data, max_pixels)
    orientation = exif_orientation(im)
    w, h = im.size
    orig = (h, w) if orientation in _SWAPS_AXES else (w, h)
    req = None
    if min_size is not None and backend != "pil" and fmt == "JPEG":
        mw, mh = min_size(orig)
        if orientation in _SWAPS_AXES:
            mw, mh = mh, mw
        req = (max(1, min(w, mw)), max(1, min(h, mh)))  # in stored (raw) orientation
    as_array = req is not None and backend in ("simplejpeg", "opencv") and im.mode in ("RGB", "L")
    head = jpeg_header(data) if fmt == "JPEG" else None
    cost = decode_cost(
        (w, h),
        req if im.mode in ("RGB", "L", "CMYK") else None,
        head,
        multi_scan=head is not None and 0 < jpeg_first_scan_components(data) < len(head.sampling),
        copies=2 if as_array and backend == "opencv" else 1,
    )
    if cost > max_pixels:
        raise ImageTooLarge(
            f"decoding this {w}x{h} image takes as much memory as {cost} pixels (a progressive "
            f"JPEG keeps every DCT coefficient at full size); the limit is {max_pixels}",
            width=w,
            height=h,
            pixels=cost,
            max_pixels=max_pixels,
        )
    claim(cost)
    try:
        out = arr = None
        if as_array:
            arr = _decode_jpeg_array(backend, data, (w, h), req, fast=fast)
            if arr is not None and not as_pixels:
                out = Image.fromarray(arr)
        if out is None and arr is None:
            if req is not None and im.mode in ("RGB", "L", "CMYK"):
                # draft() picks the largest DCT scale factor that keeps both sides >= req.
                im.draft("L" if im.mode == "L" else "RGB", req)
            im.load()
            out = to_rgb(im)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, IndexError, TypeError) as e:
        # TypeError: Pillow's decoder set-up on some corrupt PNG/TIFF headers (found by
        # tests/images/test_fuzz.py)
        raise UndecodableImage(f"cannot decode {fmt} image: {e}") from None
    if out is None:  # the decoder's array, as asked
        assert arr is not None
        decoded_size = (arr.shape[1], arr.shape[0])
        if orientation in _UPRIGHT_ARRAY:
            arr = _UPRIGHT_ARRAY[orientation](arr)
        reduced = max(1, round(max(orig) / max(decoded_size)))
        return Decoded(
            image=None, orig_size=orig, format=fmt, reduced=reduced,
            decoded_size=decoded_size, pixels=arr,
        )  # fmt: skip
    decoded_size = out.size
    if orientation in _UPRIGHT:
        out = out.transpose(_UPRIGHT[orientation])
    reduced = max(1, round(max(orig) / max(out.size)))
    return Decoded(
        image=out, orig_size=orig, format=fmt, reduced=reduced, decoded_size=decoded_size
    )


def _decoded_pixels(size: tuple[int, int], req: tuple[int, int] | None) -> int:
    """Pixels a decode of ``size`` allocates: all of them, or at the DCT scale that keeps
    at least ``req`` (as Pillow's ``draft``, simplejpeg and OpenCV pick it)."""
    w, h = size
    if req is None:
        return w * h
    s = _pow2_factor(size, req)
    return -(-w // s) * -(-h // s)


#: Bytes of one RGB pixel: the unit of the pixel budget and of ``max_pixels``.
_PIXEL_BYTES = 3
#: Bytes libjpeg keeps per DCT coefficient (JCOEF, a 16-bit integer).
_COEF_BYTES = 2


def decode_cost(
    size: tuple[int, int],
    req: tuple[int, int] | None,
    head: JpegHeader | None = None,
    *,
    multi_scan: bool = False,
    copies: int = 1,
) -> int:
    """What decoding an image of stored ``size`` costs, in RGB pixels (3 bytes each): the
    pixels it makes (at the reduced scale that keeps ``req``, times ``copies`` when the
    decoder converts them in a second array), plus the full-size intermediates. A
    progressive JPEG (or any JPEG of several scans, ``multi_scan``) is decoded from a
    buffer holding every DCT coefficient of every component at full size, 2 bytes each,
    whatever the output scale: an 8000x8000 4:4:4 one buffers 384 MB to make a 1000x1000
    image at 1/8 scale."""
    cost = _decoded_pixels(size, req) * copies
    if head is not None and (head.progressive or multi_scan):
        cost += -(-head.blocks(padded=True) * 64 * _COEF_BYTES // _PIXEL_BYTES)
    return cost


def _pow2_factor(size: tuple[int, int], req: tuple[int, int]) -> int:
    """The largest DCT scale factor of 1, 2, 4, 8 that keeps both sides >= ``req``."""
    scale = min(size[0] // req[0], size[1] // req[1])
    return 8 if scale >= 8 else 4 if scale >= 4 else 2 if scale >= 2 else 1


def _decode_jpeg_array(
    backend: str, data: bytes, size: tuple[int, int], req: tuple[int, int], *, fast: bool = False
) -> np.ndarray | None:
    """Reduced-scale JPEG decode to an HxWx3 RGB array with simplejpeg or OpenCV (both
    release the GIL); None when the library cannot take this file, so the caller falls
    back to Pillow."""
    factor = _pow2_factor(size, req)
    if backend == "simplejpeg":
        import simplejpeg

        try:
            # min_* of exactly size/factor: simplejpeg then picks scale 1/factor, never an
            # M/8 scale between (slower and less faithful: see BACKENDS).
            arr = simplejpeg.decode_jpeg(
                data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                min_width=-(-size[0] // factor), min_height=-(-size[1] // factor),
            )  # fmt: skip
        except ValueError as e:
            # libjpeg's warning that the coded data ended before the image did: Pillow
            # would pad the rest with grey, so this is a truncated file, not a fallback.
            if "premature end" in str(e).lower():
                raise UndecodableImage(
                    f"cannot decode JPEG image: truncated image: {e}", backend=backend
                ) from None
            return None
    else:
        import cv2

        flags = {
            1: cv2.IMREAD_COLOR,
            2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8,
        }[factor] | cv2.IMREAD_IGNORE_ORIENTATION
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if arr is None:
            return None
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    return arr
