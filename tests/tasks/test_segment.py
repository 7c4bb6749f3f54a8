"""The segmentation head's kernel against torch's bilinear upsampling bit for bit, against a
dense numpy reference for cropped and letterboxed frames, ``?mask=model``, and the PNG
class maps. (HF's own ``post_process_semantic_segmentation`` on a tiny SegFormer is
compared in ``test_heads.py``.)"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.models.metadata import ModelMeta
from cvserve.tasks import _segment_kernels
from cvserve.tasks.encode import decode_array, encode_result
from cvserve.tasks.params import ParamError, parse_params
from cvserve.tasks.segment import SegmentHead, model_frame, upsample_argmax


def _meta(spec: PreprocessSpec, labels: int) -> ModelMeta:
    return ModelMeta(
        name="tiny-segment", task="segment", onnx_file="none.onnx", input_name="pixel_values",
        input_shape=[None, 3, spec.height, spec.width], input_dtype="float32", output_names=[],
        preprocess=spec, labels=[f"label{i}" for i in range(labels)],
    )  # fmt: skip


def _smooth(rng: np.random.Generator, c: int, h: int, w: int, scale: float = 4.0) -> np.ndarray:
    """Blobs, like real logits: bicubically upsampled 4x4 noise per class."""
    coarse = rng.standard_normal((c, 4, 4)).astype(np.float32) * scale
    return np.stack(
        [
            np.asarray(Image.fromarray(x, "F").resize((w, h), Image.Resampling.BICUBIC))
            for x in coarse
        ]
    )


def _logits(kind: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if kind == "smooth":
        return _smooth(rng, 40, 24, 20)
    if kind == "noise":  # little pruning: many candidates per cell
        return rng.standard_normal((30, 12, 16)).astype(np.float32)
    if kind == "ties":  # small integers: exact ties everywhere, first index must win
        return rng.integers(-2, 3, (6, 9, 7)).astype(np.float32)
    if kind == "one-row":  # h = 1: every cell is clamped vertically
        return rng.standard_normal((5, 1, 9)).astype(np.float32)
    raise ValueError(kind)


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    # a * b of two float32 is exact in float64; one rounding of the sum to float32
    return (a.astype(np.float64) * b + c).astype(np.float32)


def _lerp(a, wa, b, wb):
    return _fma(a, wa, (b * wb).astype(np.float32))


def _dense_taps(n_out: int, n_in: int, frame: tuple[float, float] | None):
    i = np.arange(n_out, dtype=np.float64)
    if frame is None:  # torch: float32 scale, source index rounded to float32 once
        scale = np.float64(np.float32(n_in) / np.float32(n_out))
        src = (scale * (i + 0.5) - 0.5).astype(np.float32)
        inside = np.ones(n_out, bool)
    else:
        s, o = frame
        edge = (i + 0.5) * s + o
        inside = (edge >= 0) & (edge <= n_in)
        src = (edge - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), lam, inside


def dense_reference(logits, out_hw, frame=None, fill=255):
    """Every class at every pixel, torch's association with fma, then argmax."""
    H, W = out_hw
    c, h, w = logits.shape
    fx = None if frame is None else (frame[0], frame[1])
    fy = None if frame is None else (frame[2], frame[3])
    x0, x1, lx, inx = _dense_taps(W, w, fx)
    y0, y1, ly, iny = _dense_taps(H, h, fy)
    one = np.float32(1)
    wx0, wx1 = (one - lx)[None, None], lx[None, None]
    wy0, wy1 = (one - ly)[None, :, None], ly[None, :, None]
    top, bot = logits[:, y0], logits[:, y1]
    t0 = _lerp(top[:, :, x0], wx0, top[:, :, x1], wx1)
    t1 = _lerp(bot[:, :, x0], wx0, bot[:, :, x1], wx1)
    out = _lerp(t0, wy0, t1, wy1).argmax(0)
    out[~(iny[:, None] & inx[None])] = fill
    return out


SIZES = [(97, 61), (13, 300), (200, 150), (24, 20), (5, 700), (301, 7)]


@pytest.mark.parametrize("kind", ["smooth", "noise", "ties", "one-row"])
def test_upsample_argmax_is_torch_bit_for_bit(kind):
    """HF's post-processing is F.interpolate(bilinear) + argmax: no pixel may differ
    (outputs with H + W <= 128 take torch's separable path and are left out)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    logits = _logits(kind)
    for size in SIZES:
        ref = F.interpolate(torch.from_numpy(logits)[None], size=size, mode="bilinear")
        ref = ref[0].argmax(0).numpy()
        mask, counts = upsample_argmax(logits, size)
        assert mask.shape == size and mask.dtype == np.uint8
        assert int((mask != ref).sum()) == 0, (kind, size)
        np.testing.assert_array_equal(counts, np.bincount(ref.ravel(), minlength=len(logits)))


@pytest.mark.parametrize("kind", ["smooth", "noise", "ties"])
@pytest.mark.parametrize("mode", ["shortest_edge_crop", "letterbox"])
@pytest.mark.parametrize("orig", [(300, 200), (90, 160), (64, 48)])
def test_framed_upsampling_matches_a_dense_reference(kind, mode, orig):
    """Crops and letterboxes: every class evaluated at every pixel, same arithmetic; pixels
    outside the model's view get the fill and are not counted."""
    logits = _logits(kind)
    c, h, w = logits.shape
    spec = PreprocessSpec(height=h * 4, width=w * 4, resize_mode=mode)
    frame = model_frame(spec, orig, (h, w))
    size = (orig[1], orig[0])
    ref = dense_reference(logits, size, frame, fill=200)
    mask, counts = upsample_argmax(logits, size, frame, fill=200)
    np.testing.assert_array_equal(mask, ref)
    inside = ref != 200
    np.testing.assert_array_equal(counts, np.bincount(ref[inside], minlength=c))
    if mode == "shortest_edge_crop" and orig[0] != orig[1]:
        assert not inside.all()  # the crop cut something off: the fill path ran


def test_dense_reference_is_torch():
    """The numpy reference itself, checked where torch can check it."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    logits = _logits("smooth")
    ref = F.interpolate(torch.from_numpy(logits)[None], size=(97, 61), mode="bilinear")[0]
    np.testing.assert_array_equal(dense_reference(logits, (97, 61)), ref.argmax(0).numpy())


def test_head_answers_at_the_photo_size_by_default():
    spec = PreprocessSpec(height=80, width=96, resize_mode="direct")
    logits = _logits("smooth")
    head = SegmentHead(_meta(spec, 40))
    res = head.postprocess([logits], ImageMeta(orig_size=(150, 100), format="JPEG", reduced=1))
    assert res["mask"].shape == (100, 150) and res["mask_resolution"] == "full"
    np.testing.assert_array_equal(res["mask"], dense_reference(logits, (100, 150)))
    counts = np.bincount(res["mask"].ravel(), minlength=40)
    assert [c["index"] for c in res["classes"]] == sorted(
        np.flatnonzero(counts), key=lambda i: (-counts[i], i)
    )
    for c in res["classes"]:
        assert c["fraction"] == pytest.approx(counts[c["index"]] / res["mask"].size)


def test_mask_model_is_the_argmax_at_the_logits_resolution():
    spec = PreprocessSpec(height=80, width=96, resize_mode="direct")
    logits = _logits("ties")  # ties: the first class wins, as numpy's and torch's argmax
    head = SegmentHead(_meta(spec, 6))
    meta = ImageMeta(orig_size=(150, 100), format="JPEG", reduced=1)
    res = head.postprocess([logits], meta, mask="model")
    c, h, w = logits.shape
    assert res["mask_resolution"] == "model" and res["image_size"] == [150, 100]
    np.testing.assert_array_equal(res["mask"], logits.argmax(0))
    assert res["mask_frame"] == {"scale": [w / 150, h / 100], "offset": [0.0, 0.0]}
    counts = np.bincount(logits.argmax(0).ravel(), minlength=c)
    for cl in res["classes"]:
        assert cl["fraction"] == pytest.approx(counts[cl["index"]] / (h * w))


def test_mask_model_maps_back_through_its_frame():
    """A letterboxed photo (top-left): cells over the padding get the fill; the rest, mapped back to
    the photo through ``mask_frame``, is what the full map shows at those pixels."""
    spec = PreprocessSpec(height=64, width=64, resize_mode="letterbox")
    h = w = 16
    logits = np.zeros((2, h, w), np.float32)
    logits[1] = (np.arange(w) - 7.5)[None, :]  # class 1 right of the middle
    head = SegmentHead(_meta(spec, 2))
    meta = ImageMeta(orig_size=(200, 100), format="JPEG", reduced=1)  # 2:1, padded rows
    res = head.postprocess([logits], meta, mask="model", ignore_index=9)
    mask = res["mask"]
    (sx, sy), (ox, oy) = res["mask_frame"]["scale"], res["mask_frame"]["offset"]
    assert sx == sy == pytest.approx(w / 200) and ox == oy == 0  # padding below the photo
    rows = (np.arange(h) + 0.5 - oy) / sy  # cell centres in photo rows
    padded = (rows < 0) | (rows > 100)
    assert padded.sum() == 8 and (mask[padded] == 9).all() and (mask[~padded] != 9).all()
    np.testing.assert_array_equal(mask[~padded], np.broadcast_to(logits.argmax(0)[0], (8, w)))
    assert sum(c["fraction"] for c in res["classes"]) == pytest.approx(1)
    full = head.postprocess([logits], meta, ignore_index=9)["mask"]
    ys, xs = np.mgrid[0:100:7, 0:200:9]
    cells = mask[((ys + 0.5) * sy + oy).astype(int), ((xs + 0.5) * sx + ox).astype(int)]
    agree = (cells == full[ys, xs]).mean()
    assert agree > 0.9  # nearest cell vs bilinear: they differ only near the boundary


def test_mask_parameter_is_declared_and_checked():
    assert parse_params(SegmentHead.params, {"mask": "model"}) == {"mask": "model"}
    with pytest.raises(ParamError, match="full, model"):
        parse_params(SegmentHead.params, {"mask": "half"})
    (p,) = [p for p in SegmentHead.params if p.name == "mask"]
    assert p.describe()["choices"] == ["full", "model"] and p.default == "full"


def test_fill_is_never_counted_and_widens_the_map_when_it_must():
    spec = PreprocessSpec(height=64, width=64, resize_mode="shortest_edge_crop")
    logits = np.zeros((3, 8, 8), np.float32)
    head = SegmentHead(_meta(spec, 3))
    meta = ImageMeta(orig_size=(120, 60), format="JPEG", reduced=1)  # the crop cuts the sides
    res = head.postprocess([logits], meta, ignore_index=0)  # the fill is a class id too
    assert (res["mask"] == 0).all()
    assert res["classes"] == [{"index": 0, "label": "label0", "fraction": 1.0}]
    res = head.postprocess([logits], meta, ignore_index=1000)
    assert res["mask"].dtype == np.uint16 and res["ignore_index"] == 1000
    assert (res["mask"][:, :10] == 1000).all() and (res["mask"][:, 60] == 0).all()


def test_nan_logits_still_give_a_map():
    logits = _logits("smooth").copy()
    logits[3, 5:9, 4:8] = np.nan
    logits[:, 0, 0] = np.nan
    mask, counts = upsample_argmax(logits, (97, 61))
    assert mask.shape == (97, 61) and int(counts.sum()) == 97 * 61 and mask.max() < 40


def test_kernels_compile_when_the_head_is_made():
    SegmentHead(_meta(PreprocessSpec(height=8, width=8, resize_mode="direct"), 4))
    assert _segment_kernels.upsample_argmax.signatures
    assert _segment_kernels.candidates.signatures
    assert _segment_kernels.argmax_classes.signatures
    kernels = [_segment_kernels.upsample_argmax, _segment_kernels.candidates,
               _segment_kernels.argmax_classes]  # fmt: skip
    compiled = [list(k.signatures) for k in kernels]
    _segment_kernels.warm_up(np.dtype(np.uint8))
    assert [list(k.signatures) for k in kernels] == compiled  # already compiled: none new


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64, np.bool_])
def test_class_map_png_is_a_valid_png_of_the_same_map(dtype):
    rng = np.random.default_rng(3)
    runs = np.repeat(rng.integers(0, 150, (61, 40)), 5, axis=1)  # runs, as class maps have
    mask = {np.uint16: runs * 300 + 7, np.bool_: runs > 70}.get(dtype, runs).astype(dtype)
    mask[7] = rng.integers(0, 2, mask.shape[1]).astype(dtype)  # and one noisy row
    doc = json.loads(encode_result({"mask": mask}, "application/json")[0])["mask"]
    png = base64.b64decode(doc["png_base64"])
    with Image.open(io.BytesIO(png)) as im:
        im.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (200, 61)
        assert im.mode.startswith("I;16") if dtype == np.uint16 else im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im).astype(dtype), mask)
    assert doc["encoding"] == ("png16" if dtype == np.uint16 else "png8")
    back = decode_array(doc)
    assert back.dtype == mask.dtype
    np.testing.assert_array_equal(back, mask)


# --- served -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seg_server(model_cache):
    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.models import store
    from cvserve.serving.process import ServerThread, free_port

    store.ensure_built("tiny-segformer", model_cache)
    cfg = ServerConfig(
        port=free_port(), cache_dir=str(model_cache), models=(ModelConfig("tiny-segformer"),)
    )
    with ServerThread(cfg) as srv:
        yield srv


def test_served_mask_model(seg_server, data_dir):
    path = data_dir / "images" / "small" / "giraffe.jpg"
    w, h = Image.open(path).size
    url = "/v1/models/tiny-segformer:predict"
    with httpx.Client(base_url=seg_server.url, timeout=60) as c:
        full = c.post(url, content=path.read_bytes())
        small = c.post(f"{url}?mask=model", content=path.read_bytes())
        bad = c.post(f"{url}?mask=tiny", content=path.read_bytes())
        desc = c.get("/v1/models/tiny-segformer").json()
    assert full.status_code == 200 and small.status_code == 200, (full.text, small.text)
    body, model = full.json(), small.json()
    assert decode_array(body["mask"]).shape == (h, w) and body["mask_resolution"] == "full"
    got = decode_array(model["mask"])
    assert model["mask_resolution"] == "model" and model["image_size"] == [w, h]
    assert got.shape == (16, 16)  # tiny-segformer's logits
    assert model["mask_frame"]["scale"] == pytest.approx([16 / w, 16 / h])
    assert abs(sum(x["fraction"] for x in model["classes"]) - 1) < 1e-9
    assert bad.status_code == 400 and "mask" in bad.text
    assert any(p["name"] == "mask" for p in desc["parameters"])
