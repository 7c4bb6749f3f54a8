"""Detection, segmentation and depth models, and a pipeline, over KServe v2: their task
outputs equal what /v1 answers for the same images."""

from __future__ import annotations

import json
from difflib import SequenceMatcher

import httpx
import numpy as np
import pytest

from cvserve.config import ModelConfig, PipelineConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.encode import decode_npz

th = pytest.importorskip("tritonclient.http", reason="needs the test extra (tritonclient[http])")
from tritonclient.utils import InferenceServerException  # noqa: E402

DETECT, SEGMENT, DEPTH = "tiny-rtdetr", "tiny-segformer", "tiny-depth"
SAME_SIZE = ("dog.jpg", "groceries.jpg")  # both 800x534
OTHER_SIZE = "giraffe.jpg"  # 500x500


@pytest.fixture(scope="module")
def task_server(model_cache):
    from cvserve.models import store

    for name in (DETECT, SEGMENT, DEPTH):
        store.ensure_built(name, model_cache)
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        preprocess_threads=2,
        models=tuple(ModelConfig(name) for name in (DETECT, SEGMENT, DEPTH)),
    )
    with ServerThread(cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(task_server):
    c = th.InferenceServerClient(task_server.url.removeprefix("http://"), network_timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def photo(data_dir):
    return lambda name: (data_dir / "images" / "small" / name).read_bytes()


def _images(photos: list[bytes]):
    inp = th.InferInput("IMAGE", [len(photos)], "BYTES")
    inp.set_data_from_numpy(np.array(photos, dtype=object))
    return inp


def _v1(server, model: str, data: bytes, query: str = "") -> tuple[dict, dict]:
    r = httpx.post(
        f"{server.url}/v1/models/{model}:predict{query}",
        content=data,
        headers={"accept": "application/x-npz"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return decode_npz(r.content)


def test_metadata_lists_each_tasks_outputs(client):
    outputs = {
        m: {o["name"]: (o["datatype"], o["shape"]) for o in client.get_model_metadata(m)["outputs"]}
        for m in (DETECT, SEGMENT, DEPTH)
    }
    assert outputs[DETECT] == {
        "logits": ("FP32", [-1, -1, 5]),
        "pred_boxes": ("FP32", [-1, -1, 4]),
        "boxes": ("FP32", [-1, -1, 4]),
        "scores": ("FP32", [-1, -1]),
        "labels": ("INT64", [-1, -1]),
        "count": ("INT32", [-1]),
    }
    assert outputs[SEGMENT] == {
        "logits": ("FP32", [-1, 5, -1, -1]),
        "mask": ("UINT8", [-1, -1, -1]),
    }
    assert outputs[DEPTH]["depth"] == ("FP32", [-1, -1, -1])
    assert set(outputs[DEPTH]) == {"predicted_depth", "depth"}


def test_detections_pad_to_the_most_boxes_and_equal_v1(client, task_server, photo):
    photos = [photo(SAME_SIZE[0]), photo(OTHER_SIZE)]
    scores = [
        [d["score"] for d in _v1(task_server, DETECT, p, "?threshold=0&top_k=10")[0]["detections"]]
        for p in photos
    ]
    # a threshold that keeps a different number of boxes per image: rows get padded
    threshold = next(
        t for t in scores[0] if sum(s > t for s in scores[0]) != sum(s > t for s in scores[1])
    )
    wanted = [
        _v1(task_server, DETECT, p, f"?threshold={threshold}")[0]["detections"] for p in photos
    ]
    names = ("boxes", "scores", "labels", "count")
    r = client.infer(
        DETECT,
        [_images(photos)],
        outputs=[th.InferRequestedOutput(n) for n in names],
        parameters={"threshold": threshold},
    )
    boxes, got_scores, labels, count = (r.as_numpy(n) for n in names)
    k = max(len(w) for w in wanted)
    assert boxes.shape == (2, k, 4) and got_scores.shape == (2, k) and labels.shape == (2, k)
    assert boxes.dtype == np.float32 and labels.dtype == np.int64 and count.dtype == np.int32
    assert count.tolist() == [len(w) for w in wanted] and len(set(count.tolist())) == 2
    for i, want in enumerate(wanted):
        n = len(want)
        want_boxes = np.reshape([d["box"] for d in want], (n, 4))
        np.testing.assert_allclose(boxes[i, :n], want_boxes, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(got_scores[i, :n], [d["score"] for d in want], rtol=1e-5)
        assert labels[i, :n].tolist() == [d["index"] for d in want]
        assert not boxes[i, n:].any() and not got_scores[i, n:].any() and not labels[i, n:].any()


def test_masks_of_same_size_images_stack_and_equal_v1(client, task_server, photo):
    photos = [photo(n) for n in SAME_SIZE]
    r = client.infer(SEGMENT, [_images(photos)], outputs=[th.InferRequestedOutput("mask")])
    mask = r.as_numpy("mask")
    assert mask.shape == (2, 534, 800) and mask.dtype == np.uint8
    for m, data in zip(mask, photos, strict=True):
        np.testing.assert_array_equal(m, _v1(task_server, SEGMENT, data)[1]["mask"])


def test_maps_of_images_of_different_sizes_are_400_but_raw_outputs_stack(client, photo):
    photos = [photo(SAME_SIZE[0]), photo(OTHER_SIZE)]
    for model, output in ((SEGMENT, "mask"), (DEPTH, "depth")):
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, [_images(photos)])
        assert err.value.status() == "400"
        assert (
            f"output '{output}'" in err.value.message()
            and "800x534, 500x500" in err.value.message()
        )
    r = client.infer(SEGMENT, [_images(photos)], outputs=[th.InferRequestedOutput("logits")])
    assert r.as_numpy("logits").shape[:2] == (2, 5)


def test_depth_equals_v1(client, task_server, photo):
    data = photo(OTHER_SIZE)
    r = client.infer(DEPTH, [_images([data])])
    depth = r.as_numpy("depth")
    assert depth.shape == (1, 500, 500) and depth.dtype == np.float32
    np.testing.assert_array_equal(depth[0], _v1(task_server, DEPTH, data)[1]["depth"])
    assert r.as_numpy("predicted_depth").shape[0] == 1


@pytest.fixture(scope="module")
def ocr_server():
    pytest.importorskip("cv2", reason="the OCR pipeline needs the ocr extra")
    pytest.importorskip("pyclipper", reason="the OCR pipeline needs the ocr extra")
    cfg = ServerConfig(
        port=free_port(),
        preprocess_threads=2,
        pipelines=(PipelineConfig("ocr", max_batch_size=8, block_ms=5),),
    )
    with ServerThread(cfg) as srv:
        yield srv


def test_a_pipeline_answers_its_json_per_image(ocr_server, data_dir):
    paths = sorted((data_dir / "ocr").iterdir())[:2]
    photos = [p.read_bytes() for p in paths]
    c = th.InferenceServerClient(ocr_server.url.removeprefix("http://"), network_timeout=120)
    meta = c.get_model_metadata("ocr")
    assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "result", "datatype": "BYTES", "shape": [-1]}]
    results = c.infer("ocr", [_images(photos)]).as_numpy("result")
    assert results.shape == (2,)
    for got, data in zip(results, photos, strict=True):
        want = httpx.post(f"{ocr_server.url}/v1/pipelines/ocr:predict", content=data, timeout=120)
        lines, want_lines = json.loads(got)["lines"], want.json()["lines"]
        # boxes are per image; recognition batches crops across requests, so a character
        # may differ (tests/serving/test_pipelines.py holds the same bar)
        assert lines and len(lines) == len(want_lines)
        for g, w in zip(lines, want_lines, strict=True):
            np.testing.assert_allclose(g["box"], w["box"], atol=0.5)
        sims = [
            SequenceMatcher(None, g["text"], w["text"]).ratio()
            for g, w in zip(lines, want_lines, strict=True)
        ]
        assert np.mean(sims) >= 0.98
    tensor = th.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as err:
        c.infer("ocr", [tensor])
    assert err.value.status() == "400" and "is a pipeline and takes IMAGE" in err.value.message()
    c.close()
