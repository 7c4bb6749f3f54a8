"""The baseline server shipped in the package: naive preprocessing, served as cvserve answers."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageOps

from cvserve.bench import BenchConfig, run_bench
from cvserve.images.preprocess import Preprocessor
from cvserve.images.spec import PreprocessSpec
from cvserve.models import store
from cvserve.study.baseline import (
    DEFAULT_SPEC,
    BadImage,
    BaselineProcess,
    baseline_preprocess,
    load_model_info,
)
from cvserve.trace import parse_server_timing

TINY = PreprocessSpec(height=32, width=32, resize_shortest=36, interpolation="bicubic")
DIRECT = PreprocessSpec(height=40, width=24, resize_mode="direct", interpolation="bilinear",
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.125))  # fmt: skip


def _images(data_dir) -> list:
    return [
        *sorted((data_dir / "images" / "medium").glob("*.jpg"))[:2],
        *sorted((data_dir / "images" / "small").glob("*.jpg"))[:2],
        data_dir / "bad" / "hopper_orientation_6.jpg",  # EXIF rotation
        data_dir / "bad" / "hopper_gray.jpg",  # one channel
    ]


def _reference(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """HF's resize-then-crop semantics in float64 numpy, written out independently."""
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    resample = getattr(Image.Resampling, spec.interpolation.upper())
    if spec.resize_mode == "direct":
        px = np.asarray(im.resize((spec.width, spec.height), resample), dtype=np.float64)
    else:
        s = spec.resize_shortest
        size = (s, s * h // w) if w <= h else (s * w // h, s)
        full = np.asarray(im.resize(size, resample), dtype=np.float64)
        top, left = (full.shape[0] - spec.height) // 2, (full.shape[1] - spec.width) // 2
        px = full[top : top + spec.height, left : left + spec.width]
    x = (px / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    return x.transpose(2, 0, 1)[None]


@pytest.mark.parametrize("spec", [DEFAULT_SPEC, TINY, DIRECT], ids=["224", "tiny", "direct"])
def test_preprocess_matches_float64_reference_and_cvserve_full_decode(spec, data_dir):
    one_lsb = 1.0 / 255.0 / min(spec.std)
    pil_path = Preprocessor(spec, decoder="pil", fused=False)  # Pillow's resize, as baseline's
    for path in _images(data_dir):
        data = path.read_bytes()
        x = baseline_preprocess(data, spec)
        assert x.dtype == np.float32 and x.shape == (1, *spec.input_shape)
        assert x.flags.c_contiguous
        np.testing.assert_allclose(x, _reference(data, spec), atol=1e-5, err_msg=path.name)
        # cvserve's full-resolution decode path (one-pass resize of the crop box) agrees
        # to one 8-bit step, and almost everywhere exactly.
        ours = np.empty(spec.input_shape, np.float32)
        pil_path.run(data, ours)
        diff = np.abs(x[0] - ours)
        assert diff.max() <= one_lsb + 1e-5, path.name
        assert diff.mean() < 1e-3, path.name


def test_preprocess_keeps_raw_pixels_for_uint8_models(data_dir):
    data = (data_dir / "bad" / "hopper_orientation_6.jpg").read_bytes()
    x = baseline_preprocess(data, TINY.replace(dtype="uint8", layout="NHWC"))
    assert x.dtype == np.uint8 and x.shape == (1, 32, 32, 3)
    ref = _reference(data, TINY)[0].transpose(1, 2, 0)
    px = (ref * np.array(TINY.std) + np.array(TINY.mean)) * 255.0
    np.testing.assert_allclose(x[0], px, atol=1e-6)


def test_undecodable_bytes_raise_bad_image():
    with pytest.raises(BadImage, match="cannot decode"):
        baseline_preprocess(b"not an image")


def test_model_info_comes_from_the_sidecar(model_cache, tmp_path):
    meta = store.load_meta("tiny-resnet", model_cache)
    spec, labels = load_model_info(store.model_path(meta, model_cache))
    assert spec == meta.preprocess and spec.height == 32 and spec.resize_shortest == 36
    assert labels == meta.labels
    lone = tmp_path / "user.onnx"  # no sidecar beside it: ImageNet's 256 -> 224
    lone.write_bytes(b"")
    assert load_model_info(lone) == (DEFAULT_SPEC, [])


@pytest.fixture(scope="module")
def baseline(model_cache):
    meta = store.load_meta("tiny-resnet", model_cache)
    onnx = store.model_path(meta, model_cache)
    with BaselineProcess(onnx, "tiny-resnet") as srv:
        yield srv, onnx, meta


def _post(url: str, data: bytes) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_baseline_server_answers_like_cvserve(baseline, data_dir):
    srv, onnx, meta = baseline
    path = sorted((data_dir / "images" / "medium").glob("*.jpg"))[0]
    data = path.read_bytes()
    status, headers, body = _post(f"{srv.url}/v1/models/tiny-resnet:predict?top_k=3", data)
    assert status == 200, body
    assert body["model"] == "tiny-resnet" and body["task"] == "classify"
    assert body["batch_size"] == 1
    assert body["image_size"] == list(ImageOps.exif_transpose(Image.open(path)).size)
    # The scores are the softmax of the model's logits on the naive input (float64).
    x = baseline_preprocess(data, meta.preprocess)
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    z = sess.run(None, {sess.get_inputs()[0].name: x})[0][0].astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    best = np.argsort(-p)[:3]
    assert [t["index"] for t in body["top_k"]] == best.tolist()
    assert [t["label"] for t in body["top_k"]] == [meta.labels[i] for i in best]
    np.testing.assert_allclose([t["score"] for t in body["top_k"]], p[best], rtol=1e-5)

    stages, bad = parse_server_timing(headers["server-timing"])
    assert bad == 0
    assert {"recv", "decode", "resize", "normalize", "infer", "postprocess"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and stages["decode"] > 0


def test_baseline_server_errors_and_model_info(baseline):
    srv, _, meta = baseline
    status, _, body = _post(f"{srv.url}/v1/models/tiny-resnet:predict", b"garbage")
    assert status == 400 and "cannot decode" in body["error"]["message"]
    status, _, body = _post(f"{srv.url}/v1/models/other:predict", b"garbage")
    assert status == 404 and body["error"]["kind"] == "not_found"
    status, _, body = _post(f"{srv.url}/v1/models/tiny-resnet:predict?top_k=0", b"x")
    assert status == 400 and "top_k" in body["error"]["message"]
    with urllib.request.urlopen(f"{srv.url}/v1/models/tiny-resnet", timeout=10) as r:
        info = json.loads(r.read())
    assert PreprocessSpec.from_dict(info["preprocess"]) == meta.preprocess
    assert info["batching"]["max_batch_size"] == 1


def test_bench_drives_the_baseline_and_breaks_its_time_down(baseline, data_dir):
    srv, _, _ = baseline
    res = run_bench(BenchConfig(
        url=srv.url, model="tiny-resnet", images=data_dir / "images" / "small",
        concurrency=[2], requests=12, warmup=0.0,
    ))  # fmt: skip
    (point,) = res.points
    assert point.ok == 12 and point.errors["total"] == 0
    assert point.server_timing_missing == 0 and point.server_timing_malformed == 0
    assert {"decode", "resize", "normalize", "infer"} <= set(point.breakdown_ms)
    assert point.breakdown_ms["decode"] > 0
