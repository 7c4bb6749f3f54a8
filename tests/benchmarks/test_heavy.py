"""The heavy-workload baselines (``benchmarks/baselines/``) answer what their libraries
answer, and ``benchmarks/heavy.py`` runs end to end with its smallest settings."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("fastapi", reason="the baseline servers are FastAPI apps")

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
SEG_MODEL = "tiny-segformer"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def heavy():
    return _load("heavy_benchmark", BENCHMARKS / "heavy.py")


@pytest.fixture(scope="module")
def seg_cache(model_cache):
    from cvserve.models import store

    store.ensure_built(SEG_MODEL, model_cache)
    return model_cache


def _upright_rgb(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def test_text_similarity(heavy):
    assert heavy.text_similarity(["EPPING", "Twinned with"], ["EPPING", "Twinned with"]) == 1.0
    # the same characters, split into other lines, are not the same answer
    assert heavy.text_similarity(["ab", "c"], ["a", "bc"]) < 1.0
    assert heavy.text_similarity(["abcd"], ["abed"]) == pytest.approx(0.75)
    assert heavy.text_similarity([], ["x"]) == 0.0


def test_ocr_baseline_answers_what_rapidocr_does(heavy, data_dir):
    pytest.importorskip("rapidocr_onnxruntime", reason="OCR models come with the ocr extra")
    from rapidocr_onnxruntime import RapidOCR

    data = (data_dir / "ocr" / "img_exif_orientation.jpg").read_bytes()
    bgr = np.ascontiguousarray(np.asarray(_upright_rgb(data))[:, :, ::-1])
    want, _ = RapidOCR()(bgr)
    assert want, "RapidOCR finds text in this image"
    with heavy.baseline_process("ocr_server.py", []) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = c.post("/ocr", content=data, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            lines = r.json()["lines"]
            # the route cvserve bench posts to is the same endpoint
            bench = c.post("/v1/pipelines/ocr:predict", content=data)
            assert bench.status_code == 200 and bench.json() == r.json()
            assert c.post("/ocr", content=b"not an image").status_code == 400
    assert [ln["text"] for ln in lines] == [text for _, text, _ in want]
    # independent of RapidOCR: the upright text (EXIF orientation 3), per MANIFEST.tsv
    assert lines[0]["text"] == "我是中国人"
    for ln, (box, _, score) in zip(lines, want, strict=True):
        np.testing.assert_allclose(ln["box"], np.asarray(box, dtype=float))
        assert ln["score"] == pytest.approx(float(score))


def test_segment_baseline_is_hf_post_processing_at_the_photo_size(heavy, seg_cache, data_dir):
    torch = pytest.importorskip("torch", reason="HF post-processing needs the zoo extra")
    import onnxruntime as ort

    from cvserve.models import store
    from cvserve.models.build import preprocess_spec_from_hf
    from cvserve.tasks.encode import decode_array

    server = _load("segment_server", BENCHMARKS / "baselines" / "segment_server.py")
    meta = store.load_meta(SEG_MODEL, seg_cache)
    processor = server.image_processor(SEG_MODEL)
    # the processor is built with the preprocessing cvserve serves the model with
    assert preprocess_spec_from_hf(processor) == meta.preprocess

    path = data_dir / "images" / "small" / "dog.jpg"
    data = path.read_bytes()
    image = _upright_rgb(data)
    w, h = image.size
    session = ort.InferenceSession(str(store.model_path(meta, seg_cache)))
    pixels = processor(images=image, return_tensors="np")["pixel_values"]
    logits = session.run(None, {meta.input_name: pixels.astype(np.float32)})[0]

    outputs = SimpleNamespace(logits=torch.from_numpy(logits))
    want = processor.post_process_semantic_segmentation(outputs, target_sizes=[(h, w)])[0]
    want = want.numpy()

    args = ["--model", SEG_MODEL, "--cache-dir", str(seg_cache)]
    with heavy.baseline_process("segment_server.py", args) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            r = c.post("/segment", content=data, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            bench = c.post(f"/v1/models/{SEG_MODEL}:predict", content=data)
            assert bench.status_code == 200 and bench.json() == r.json()
    body = r.json()
    mask = decode_array(body["mask"])
    assert body["image_size"] == [w, h] and mask.shape == (h, w)
    np.testing.assert_array_equal(mask, want)
    counts = np.bincount(want.reshape(-1))
    fractions = {c["index"]: c["fraction"] for c in body["classes"]}
    assert fractions == {i: pytest.approx(n / want.size) for i, n in enumerate(counts) if n}
    assert sum(fractions.values()) == pytest.approx(1.0)


def test_heavy_benchmark_runs_end_to_end(seg_cache, data_dir, tmp_path):
    pytest.importorskip("rapidocr_onnxruntime", reason="OCR models come with the ocr extra")
    pytest.importorskip("torch", reason="HF post-processing needs the zoo extra")
    out = tmp_path / "heavy.json"
    cmd = [
        sys.executable, str(BENCHMARKS / "heavy.py"),
        "--model", SEG_MODEL, "--cache-dir", str(seg_cache),
        "--ocr-images", str(data_dir / "ocr" / "ger_1.jpg"),
        "--segment-images", str(data_dir / "images" / "small" / "dog.jpg"),
        "--concurrency", "1", "--duration", "2", "--warmup", "0", "--repeats", "1",
        "--cvserve-arg=--max-batch-size 2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    got = {(s["workload"], s["server"]) for s in doc["summary"]}
    assert got == {(w, s) for w in ("ocr", "segment") for s in ("baseline", "cvserve")}
    for s in doc["summary"]:
        assert s["errors"] == 0 and s["throughput_rps_median"] > 0, s
        if s["server"] == "cvserve":
            assert s["x_baseline_median"] == pytest.approx(
                s["throughput_rps_median"]
                / next(b["throughput_rps_median"] for b in doc["summary"]
                       if (b["workload"], b["server"]) == (s["workload"], "baseline"))
            )  # fmt: skip
            assert {"decode", "infer", "postprocess"} <= set(s["breakdown_ms_median"])
        else:
            assert s["breakdown_ms_median"] == {}  # the baselines send no Server-Timing
    assert doc["servers"]["ocr"]["cvserve"] == "cvserve serve --pipeline ocr " + (
        f"--cache-dir {seg_cache} --max-batch-size 2"
    )
    ocr = doc["checks"]["ocr"]
    assert ocr["min_similarity"] == 1.0 and ocr["differ"] == []
    assert ocr["per_image"][0]["baseline"][0] == "EPPING"  # what the sign says
    seg = doc["checks"]["segment"]
    assert seg["shape_mismatch"] == [] and seg["per_image"][0]["shape"] == [534, 800]
    assert {g["goal"] for g in doc["goals"]} == {
        "ocr p50 speed x baseline at c=1",
        "ocr text similarity, min over images",
    }
    assert "goals (issue 11)" in proc.stdout
