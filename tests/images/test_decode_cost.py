"""What decoding really costs (the pixel budget's claim) and truncated JPEGs (400).

A progressive JPEG decodes from a buffer of every DCT coefficient at full size, whatever
the output scale; a JPEG whose coded data ends early is padded by libjpeg with invented
blocks. Both are tested on small files with headers rewritten to declare a large size:
nothing here allocates a large image.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from cvserve.images.budget import PixelBudget
from cvserve.images.decode import (
    BACKENDS,
    ImageTooLarge,
    UndecodableImage,
    decode,
    decode_cost,
    jpeg_first_scan_components,
    jpeg_header,
)


def _jpeg(w: int = 64, h: int = 48, **save: object) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80, **save)
    return buf.getvalue()


def _declare(data: bytes, w: int, h: int) -> bytes:
    """``data`` with its frame header rewritten to declare ``w`` x ``h``."""
    head = jpeg_header(data)
    at = data.index(bytes([0xFF, head.sof]))
    out = bytearray(data)
    out[at + 5 : at + 7] = h.to_bytes(2, "big")
    out[at + 7 : at + 9] = w.to_bytes(2, "big")
    return bytes(out)


def _quarter(orig: tuple[int, int]) -> tuple[int, int]:
    return max(1, orig[0] // 8), max(1, orig[1] // 8)


def test_the_header_reader_tells_progressive_from_baseline() -> None:
    base, prog = _jpeg(), _jpeg(progressive=True)
    hb, hp = jpeg_header(base), jpeg_header(prog)
    assert (hb.sof, hb.progressive) == (0xC0, False)
    assert (hp.sof, hp.progressive) == (0xC2, True)
    assert hb.sampling == hp.sampling == ((2, 2), (1, 1), (1, 1))  # Pillow's default 4:2:0
    assert jpeg_header(_jpeg(subsampling=0)).sampling == ((1, 1),) * 3
    # A progressive file's first scan is its DC scan of ... some components; a baseline
    # file's one scan has them all.
    assert jpeg_first_scan_components(base) == 3
    assert 1 <= jpeg_first_scan_components(prog) <= 3


@pytest.mark.parametrize(
    ("subsampling", "coefficients"),
    [
        (0, 3 * 1000 * 1000 * 64),  # 4:4:4: three full-size planes of 8x8 blocks
        (2, (1000 * 1000 + 2 * 500 * 500) * 64),  # 4:2:0: chroma at a quarter
    ],
)
def test_a_progressive_8000x8000_jpeg_costs_its_coefficients_not_its_thumbnail(
    subsampling: int, coefficients: int
) -> None:
    head = jpeg_header(_jpeg(progressive=True, subsampling=subsampling))
    head = dataclasses.replace(head, width=8000, height=8000)
    baseline = dataclasses.replace(head, sof=0xC0)
    req = (1000, 1000)  # a model that needs 1/8 scale
    assert decode_cost((8000, 8000), req, baseline) == 1000 * 1000
    cost = decode_cost((8000, 8000), req, head)
    # 2 bytes per coefficient, counted in RGB pixels of 3 bytes
    assert cost == 1000 * 1000 + -(-coefficients * 2 // 3)
    if subsampling == 0:  # the number: ~364 MiB of coefficients
        assert (cost - 1000 * 1000) * 3 / 2**20 == pytest.approx(366.2, abs=0.1)
    # a sequential JPEG coded in several scans buffers the same
    assert decode_cost((8000, 8000), req, baseline, multi_scan=True) == cost


def test_decode_claims_the_coefficient_buffer_before_decoding() -> None:
    data = _jpeg(640, 480, progressive=True)
    head = jpeg_header(data)
    budget = PixelBudget(10**9)
    with budget.scope():
        dec = decode(data, min_size=_quarter)
        claimed = budget.in_flight
    assert dec.image.size == (80, 60) and dec.reduced == 8
    blocks = (80 * 60 + 2 * 40 * 30) * 64  # 640x480 4:2:0, padded to whole MCUs
    assert claimed == 80 * 60 + -(-blocks * 2 // 3) == decode_cost((640, 480), (80, 60), head)
    assert claimed > 640 * 480 // 2  # not the 4,800 pixels the output has
    # a baseline file of the same size claims only what it makes
    with budget.scope():
        decode(_jpeg(640, 480), min_size=_quarter)
        assert budget.in_flight == 80 * 60


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_progressive_jpeg_whose_coefficients_pass_the_limit_is_refused(backend: str) -> None:
    data = _declare(_jpeg(progressive=True, subsampling=0), 8000, 8000)
    data += bytes(400_000)  # past the EOI: long enough not to be a truncated file
    with pytest.raises(ImageTooLarge, match=r"as much memory as \d+ pixels \(a progressive") as e:
        decode(data, min_size=_quarter, backend=backend)  # 64,000,000 declared: at the limit
    assert e.value.status == 413 and e.value.detail["max_pixels"] == 64_000_000
    # 1,000,000 output pixels at 1/8 scale (all 64,000,000 with `pil`), plus 3 planes of
    # coefficients: 192,000,000 values of 2 bytes = 128,000,000 pixels of 3 bytes
    assert e.value.detail["pixels"] >= 128_000_000 + 1_000_000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduced", [False, True])
def test_a_jpeg_far_shorter_than_its_declared_size_is_truncated(backend: str, reduced: bool):
    liar = _declare(_jpeg(16, 16), 7999, 7999)  # 7999x7999 declared, ~700 bytes
    assert len(liar) < 1000
    with pytest.raises(UndecodableImage, match=r"truncated image: a 7999x7999 JPEG needs at"):
        decode(liar, backend=backend, min_size=_quarter if reduced else None)
    # the same for progressive, whose DC scan alone costs a bit per block
    prog = _declare(_jpeg(16, 16, progressive=True), 7999, 7999)
    with pytest.raises(UndecodableImage, match="truncated image") as info:
        decode(prog, backend=backend, min_size=_quarter if reduced else None)
    assert info.value.status == 400 and info.value.detail["bytes"] == len(prog)


def test_the_floor_passes_the_smallest_real_jpegs() -> None:
    flat = Image.new("RGB", (4000, 3000), (120, 130, 140))  # codes to ~2 bits per block
    for save in ({}, {"optimize": True}, {"progressive": True}):
        buf = io.BytesIO()
        flat.save(buf, "JPEG", quality=75, **save)
        data = buf.getvalue()
        assert len(data) >= jpeg_header(data).min_coded_bytes()
        assert decode(data, min_size=_quarter).orig_size == (4000, 3000)


def test_simplejpeg_names_a_stream_that_ends_early(data_dir) -> None:
    photo = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    cut = photo[: len(photo) // 2] + b"\xff\xd9"  # coded data stops halfway, then EOI
    with pytest.raises(UndecodableImage, match="truncated image: .*premature end"):
        decode(cut, backend="simplejpeg", min_size=lambda o: (o[0] // 2, o[1] // 2))
