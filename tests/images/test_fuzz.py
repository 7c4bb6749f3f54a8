"""Property-based fuzzing of the decoding front: arbitrary bytes and mutated real files
either decode to an RGB image within the pixel limit or fail with one of the documented
4xx errors (400 undecodable, 413 too large, 415 unsupported), never anything else; and
every decode claims from the pixel budget, before decoding, at least the pixels it makes.

Deterministic in CI: a fixed number of examples, derandomized, no example database.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import DATA  # the shared data: $CVSERVE_DATA or ../shared/data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvserve.images.budget import PixelBudget
from cvserve.images.decode import BACKENDS, ImageError, decode

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: What a model asks for: a 224 crop, decoded with a 1.5x margin (as the Preprocessor).
TARGET = 336
MAGICS = [b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"\x89PNG\r\n\x1a\n",
          b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00",
          b"MM\x00*", b"\x00\x00\x00\x18ftypheic"]  # fmt: skip


def _min_size(orig: tuple[int, int]) -> tuple[int, int]:
    w, h = orig
    s = TARGET / min(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _made_up() -> dict[str, bytes]:
    """Small files in the modes and formats the shared data set has few of."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = {}
    for name, im, fmt in (
        ("rgb.png", rgb, "PNG"),
        ("la.png", rgb.convert("LA"), "PNG"),
        ("p.gif", rgb.convert("P"), "GIF"),
        ("i16.png", Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)),
         "PNG"),
        ("rgba.webp", rgb.convert("RGBA"), "WEBP"),
        ("cmyk.jpg", rgb.convert("CMYK"), "JPEG"),
        ("gray.tif", rgb.convert("L"), "TIFF"),
        ("rgb.bmp", rgb, "BMP"),
        ("big.jpg", rgb.resize((1600, 1200)), "JPEG"),  # reduced-scale decoding
    ):  # fmt: skip
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[name] = buf.getvalue()
    return out


def _seeds() -> dict[str, bytes]:
    seeds = {p.name: p.read_bytes() for p in sorted((DATA / "bad").iterdir()) if p.is_file()}
    for name in ("dog.jpg", "kodak-dc240.jpg", "olympus-c960.jpg"):
        seeds[name] = (DATA / "images" / "small" / name).read_bytes()
    return {**seeds, **_made_up()}


SEEDS = _seeds() if (DATA / "bad").is_dir() else {}
needs_data = pytest.mark.skipif(not SEEDS, reason=f"shared test data not found at {DATA}")


@st.composite
def mutated(draw) -> bytes:
    """A real file with a few random edits, most of them in its header."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        if n == 0:
            data += draw(st.binary(min_size=1, max_size=64))
            continue
        pos = draw(st.one_of(st.integers(0, min(n, 512) - 1), st.integers(0, n - 1)))
        op = draw(st.sampled_from(["flip", "set", "big", "cut", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "big":  # a size field pushed up: the limits must hold
            data[pos : pos + 2] = draw(st.sampled_from([b"\xff\xff", b"\x7f\xff", b"\x00\x00"]))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[pos : pos + draw(st.integers(1, 256))]
    return bytes(data)


def _check(data: bytes, backend: str, max_pixels: int) -> None:
    """Decoded within the limits, with its pixels claimed first; or a documented 4xx."""
    budget = PixelBudget(10**15)
    with budget.scope():
        try:
            dec = decode(data, max_pixels=max_pixels, min_size=_min_size, backend=backend)
        except ImageError as e:
            assert e.status in (400, 413, 415), e
            return
        claimed = budget.in_flight
    assert budget.in_flight == 0  # given back at the end of the scope
    w, h = dec.image.size
    assert dec.image.mode == "RGB" and w >= 1 and h >= 1
    assert w * h <= claimed <= max_pixels
    assert dec.orig_size[0] * dec.orig_size[1] <= max_pixels


BACKEND = st.sampled_from(BACKENDS)
LIMIT = st.sampled_from([20_000, 400_000, 5_000_000])


@needs_data
@FUZZ
@given(data=mutated(), backend=BACKEND, max_pixels=LIMIT)
def test_mutated_real_files_decode_or_fail_with_a_documented_4xx(data, backend, max_pixels):
    _check(data, backend, max_pixels)


@FUZZ
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=2048), backend=BACKEND,
       max_pixels=LIMIT)  # fmt: skip
def test_arbitrary_bytes_decode_or_fail_with_a_documented_4xx(magic, tail, backend, max_pixels):
    _check(magic + tail, backend, max_pixels)


@needs_data
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_file_meets_the_same_properties(name):
    for backend in BACKENDS:
        _check(SEEDS[name], backend, 5_000_000)


@needs_data
def test_a_truncated_interlaced_png_is_a_400_not_a_500():
    """Found by the fuzzing above: reading the EXIF of a truncated interlaced PNG loads it
    and fails; loading it again raised TypeError from Pillow's decoder set-up."""
    data = SEEDS["pil123rgba.png"][:153]
    for backend in BACKENDS:
        with pytest.raises(ImageError) as e:
            decode(data, backend=backend)
        assert e.value.status == 400
