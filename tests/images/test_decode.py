"""Decoding real files: every shared bad file, EXIF orientation, colour modes, bombs."""

from __future__ import annotations

import io
import resource
import sys

import numpy as np
import pytest
from bad_files import BY_EXTRA, KIND, OPENCV_LENIENT, STATUS
from PIL import Image, ImageFilter

from cvserve.images.decode import (
    BACKENDS,
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageType,
    decode,
    sniff_format,
)

# What each file in shared/data/bad must give: a decoded image of this (w, h), or an error.
EXPECTED = {
    "79f5fc6bca756e1f067c6fc83e18b32e.jpg": UndecodableImage,
    "app13-multiple.jpg": (256, 160),
    "broken.png": UndecodableImage,
    "decompression_bomb.gif": ImageTooLarge,
    "f006e96f3b27fdfaa075322d759ea2e8.jpg": UndecodableImage,
    "hopper.bmp": (128, 128),
    "hopper.heif": (128, 128),  # by the heic extra
    "hopper.webp": (128, 128),
    "hopper_16bit_qtables.jpg": (128, 128),
    "hopper_bad_exif.jpg": (500, 500),
    "hopper_gray.jpg": (128, 128),
    "hopper_lzw.tif": (128, 128),
    "hopper_orientation_6.jpg": (128, 128),
    "hopper_orientation_8.jpg": (128, 128),
    "i_trns.png": (64, 64),
    "iss634.gif": (245, 245),
    "iss634.webp": (245, 245),
    "junk_jpeg_header.jpg": (1024, 768),
    "max_size.jpg": ImageTooLarge,
    "monkey12.jpg": UnsupportedImageType,
    "monkey16.png": (149, 227),
    "notjpeg.jpg": UndecodableImage,
    "p_trns_single.png": (64, 64),
    "pil123p.png": (162, 150),
    "pil123rgba.png": (162, 150),
    "pil_sample_cmyk.jpg": (100, 100),
    "png_decompression_dos.png": ImageTooLarge,
    "reallybig.bmp": ImageTooLarge,
    "shortfile.bmp": UndecodableImage,
    "sugarshack.mpo": (640, 480),
    "testimgari.jpg": (227, 149),
    "tiff_16bit_RGB.tiff": (100, 40),
    "truncated.jpg": UndecodableImage,
    "truncated_image.png": UndecodableImage,
    "truncated_jpeg.jpg": UndecodableImage,
    "ultrahdr.jpg": UndecodableImage,
    "zero_width.gif": UndecodableImage,
}


LENIENT_IN_OPENCV = OPENCV_LENIENT


def test_expectations_cover_every_bad_file(data_dir):
    assert sorted(p.name for p in (data_dir / "bad").iterdir()) == sorted(EXPECTED)
    assert sorted(STATUS) == sorted(EXPECTED)


def test_the_status_table_agrees_with_the_manifest_and_the_decoder(data_dir):
    """tests/bad_files.py: 200 exactly where MANIFEST.tsv says Pillow decodes the file, and
    each error status is the one of the error the decoder documents for that file."""
    rows = (data_dir / "MANIFEST.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    notes = {
        r["file"].removeprefix("bad/"): r["notes"]
        for r in (dict(zip(header, line.split("\t"), strict=False)) for line in rows[1:])
        if r["file"].startswith("bad/")
    }
    assert sorted(notes) == sorted(STATUS)
    for name, status in STATUS.items():
        decodes = "Pillow 13.0.0: decodes OK" in notes[name] or name in BY_EXTRA
        assert decodes == (status == 200), name
        want = EXPECTED[name]
        assert status == (200 if isinstance(want, tuple) else want.status), name
        if "DecompressionBombError" in notes[name]:
            assert status == 413, name


def _backends() -> list[str]:
    out = list(BACKENDS)
    try:
        import cv2  # noqa: F401
    except ImportError:
        out.remove("opencv")
    return out


def _quarter(size: tuple[int, int]) -> tuple[int, int]:
    return max(1, size[0] // 4), max(1, size[1] // 4)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file(data_dir, name, backend):
    data = (data_dir / "bad" / name).read_bytes()
    want = EXPECTED[name]
    if isinstance(want, tuple):
        full = decode(data, backend="pil")
        d = decode(data, backend=backend, min_size=_quarter)
        assert d.image.mode == "RGB"
        assert full.image.size == want == d.orig_size
        # Reduced decoding keeps the aspect ratio and never goes below the request.
        assert d.image.size[0] >= want[0] // 4 and d.image.size[1] >= want[1] // 4
        assert abs(d.image.size[0] / d.image.size[1] - want[0] / want[1]) < 0.05
        if d.image.size != want:
            ref = full.image.resize(d.image.size, Image.Resampling.BOX)
            assert _mean_abs(d.image, ref) < 12  # the same picture, upright
        a = np.asarray(d.image)
        if name != "i_trns.png":  # 16-bit samples all <= 255: correctly near-black
            assert a.std() > 1  # real picture content, not a blank frame
    elif backend == "opencv" and name in LENIENT_IN_OPENCV:
        # OpenCV ignores libjpeg's corrupt-data warnings and returns the partial pixels.
        d = decode(data, backend=backend, min_size=_quarter)
        assert d.image.mode == "RGB" and d.image.size[0] >= d.orig_size[0] // 4
    else:
        with pytest.raises(want) as info:
            decode(data, backend=backend, min_size=_quarter)
        assert info.value.status == STATUS[name]
        assert info.value.kind == KIND[STATUS[name]]
        assert str(info.value)


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize("name", ["hopper_orientation_6.jpg", "hopper_orientation_8.jpg"])
def test_exif_orientation_comes_out_upright(data_dir, name):
    upright = Image.open(data_dir / "bad" / "hopper.bmp").convert("RGB")
    got = decode((data_dir / "bad" / name).read_bytes()).image
    raw = Image.open(data_dir / "bad" / name).convert("RGB")  # pixels as stored
    # The decoded image matches the upright picture far better than any other rotation.
    others = [raw.transpose(t) for t in (Image.Transpose.ROTATE_180,)] + [raw]
    assert _mean_abs(got, upright) < 8
    assert all(_mean_abs(o, upright) > 3 * _mean_abs(got, upright) for o in others)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reduced_and_full(orientation, backend):
    # A 400x200 picture, stored so that a viewer applying `orientation` shows it upright.
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 256, (200, 400, 3), dtype=np.uint8))
    upright = upright.resize((400, 200)).filter(ImageFilter.GaussianBlur(4))
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = upright.transpose(inverse[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    for min_size in (None, _quarter):
        d = decode(buf.getvalue(), min_size=min_size, backend=backend)
        assert d.orig_size == (400, 200)
        expect = upright.resize(d.image.size, Image.Resampling.BOX)
        assert d.image.size[0] > d.image.size[1]  # landscape, as shown upright
        assert _mean_abs(d.image, expect) < 6


@pytest.mark.parametrize("backend", _backends())
def test_reduced_decode_never_goes_below_the_request(data_dir, backend):
    for path in sorted((data_dir / "images").glob("*/*.jpg")):
        data = path.read_bytes()
        full = decode(data, backend="pil")
        d = decode(
            data,
            backend=backend,
            min_size=lambda size: (size[0] * 256 // min(size), size[1] * 256 // min(size)),
        )
        w, h = full.orig_size
        need = (w * 256 // min(w, h), h * 256 // min(w, h))
        assert d.orig_size == full.orig_size
        assert d.image.size[0] >= need[0] and d.image.size[1] >= need[1]
        if min(w, h) >= 1024 and backend != "pil":
            assert d.reduced >= 2  # big photos really decode at reduced scale


def test_cmyk_jpeg_round_trips_to_the_right_colours():
    rgb = Image.new("RGB", (64, 64))
    rgb.paste((220, 30, 30), (0, 0, 32, 64))
    rgb.paste((30, 200, 60), (32, 0, 64, 64))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG", quality=95)
    d = decode(buf.getvalue())
    assert _mean_abs(d.image, rgb) < 10


def test_shared_cmyk_file_has_the_right_colours(data_dir):
    path = data_dir / "bad" / "pil_sample_cmyk.jpg"
    got = np.asarray(decode(path.read_bytes()).image, np.float64)
    cmyk = np.asarray(Image.open(path), np.float64)  # Adobe-inverted samples, un-inverted
    c, m, y, k = (cmyk[..., i] for i in range(4))
    ref = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)], -1)
    ref /= 255.0
    # libjpeg-turbo via OpenCV decodes this file to the same colours (mean diff 0.7).
    assert np.abs(got - ref).mean() < 2
    assert np.abs(got - (255 - ref)).mean() > 50  # not inverted


def test_sixteen_bit_grey_is_scaled_not_clipped():
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, "PNG")
    got = np.asarray(decode(buf.getvalue()).image)[..., 0].astype(int)
    want = np.round(a16.astype(float) * 255 / 65535).astype(int)
    assert np.abs(got - want).max() <= 1


def test_bombs_are_refused_without_allocating_pixels(data_dir):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("decompression_bomb.gif", "max_size.jpg", "reallybig.bmp"):
        with pytest.raises(ImageTooLarge) as info:
            decode((data_dir / "bad" / name).read_bytes())
        assert info.value.status == 413
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100  # each declares >= 4 gigapixels


def test_pixel_limit_is_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    with pytest.raises(ImageTooLarge) as info:
        decode(buf.getvalue(), max_pixels=300 * 200 - 1)
    assert info.value.detail["max_pixels"] == 300 * 200 - 1
    decode(buf.getvalue(), max_pixels=300 * 200)


def test_errors_are_image_errors():
    with pytest.raises(ImageError):
        decode(b"not an image at all")


def _encoded(fmt: str, size=(96, 64)) -> bytes:
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    im = Image.new("RGB", size, (200, 30, 60))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_avif_and_heic_decode_under_the_same_limits(fmt):
    data = _encoded(fmt)
    assert sniff_format(data) == fmt
    d = decode(data)
    assert d.format == fmt and d.image.size == (96, 64) and d.image.mode == "RGB"
    r, g, b = np.asarray(d.image).reshape(-1, 3).mean(axis=0)
    assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 60) < 12
    with pytest.raises(ImageTooLarge, match="96x64"):  # from the header, before decoding
        decode(data, max_pixels=96 * 64 - 1)


def test_heic_without_the_extra_is_a_415_naming_it(monkeypatch):
    data = _encoded("HEIF")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails as if absent
    with pytest.raises(UnsupportedImageType, match=r"pip install 'cvserve\[heic\]'") as info:
        decode(data)
    assert info.value.status == 415 and "HEIF" not in info.value.detail["supported"]


def test_an_mp4_is_not_an_image():
    mp4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + bytes(64)
    assert sniff_format(mp4) is None
    with pytest.raises(UnsupportedImageType, match="unknown"):
        decode(mp4)
