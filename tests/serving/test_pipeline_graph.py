"""A pipeline declared only in YAML: a detector, a filter, crops with a margin, a
classifier and an embedder on a branch (both per crop, over the broker), the classifier
on the whole image beside them, and a gallery of named vectors. Served over the
in-process broker (workers in the server) and over Redis Streams (workers in
``cvserve worker`` processes), and checked against running the same models one by one on
the same crops. Invalid graphs are one line at start-up naming the step."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from served import stop_processes

from cvserve.config import ConfigError, load_config
from cvserve.images.transforms import normalize_into
from cvserve.serving.process import ServerThread, free_port

EMBED_DIM = 8
MARGIN = 0.1

GRAPH = """
server:
  broker: "{broker}"
pipelines:
  - name: people
    stage_workers: {workers}
    block_ms: 5
    steps:
      - name: detect
        model: tiny-yolos
        params: {{threshold: 0.0, top_k: 5, clip: true}}
      - name: best
        filter: detect
        top_k: 3
      - name: crops
        crop: best
        margin: {margin}
      - name: classify
        model: tiny-resnet
        input: crops
        via: broker
        max_batch_size: 4
        params: {{top_k: 2}}
      - name: embed
        model: standin-embed
        input: crops
        via: broker
      - name: who
        gallery: embed
        file: {gallery}
        k: 2
      - name: whole
        model: tiny-resnet
        params: {{top_k: 1}}
"""


def _standin_embedder(path: Path) -> np.ndarray:
    """An ONNX whose output row is one vector: the mean of each input channel times W.
    Returns W, so the test computes the same embedding in float64 numpy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(3).normal(size=(3, EMBED_DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["y"]),
        ],  # fmt: skip
        "standin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", EMBED_DIM])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return w


@pytest.fixture(scope="module")
def built(model_cache, tmp_path_factory):
    from cvserve.images.spec import PreprocessSpec
    from cvserve.models import store

    store.ensure_built("tiny-yolos", model_cache)
    tmp = tmp_path_factory.mktemp("standin")
    w = _standin_embedder(tmp / "embed.onnx")
    spec = PreprocessSpec(height=32, width=32, resize_shortest=32)
    store.add_model(tmp / "embed.onnx", "standin-embed", task="embed", spec=spec,
                    cache=model_cache, overwrite=True)  # fmt: skip
    names = ["ann", "bob", "cy", "dee"]
    vectors = np.random.default_rng(4).normal(size=(len(names), EMBED_DIM))
    np.savez(tmp / "gallery.npz", names=np.array(names), vectors=vectors)
    return model_cache, w, tmp / "gallery.npz"


def _config(tmp_path: Path, broker: str, workers: int, gallery: Path) -> Path:
    path = tmp_path / "people.yaml"
    path.write_text(GRAPH.format(broker=broker, workers=workers, gallery=gallery, margin=MARGIN))
    return path


def _expected(cache, w: np.ndarray, gallery: Path, photo: bytes, answer: dict) -> None:
    """The same models one by one on the same crops (boxes from the answer's detector)."""
    import io

    from cvserve.models import store
    from cvserve.tasks.base import softmax

    image = Image.open(io.BytesIO(photo)).convert("RGB")
    cls = store.load_meta("tiny-resnet", cache)
    emb = store.load_meta("standin-embed", cache)
    sessions = {m.name: ort.InferenceSession(str(store.model_path(m, cache))) for m in (cls, emb)}
    dets = sorted(answer["detect"]["detections"], key=lambda d: -d["score"])[:3]
    assert len(answer["crops"]) == len(dets) > 0
    with np.load(gallery) as f:
        names, vectors = list(f["names"]), f["vectors"]
    for det, crop in zip(dets, answer["crops"], strict=True):
        assert crop["box"] == [round(v, 1) for v in det["box"]]
        x0, y0, x1, y1 = det["box"]
        bw, bh = x1 - x0, y1 - y0
        x0, y0 = max(0.0, x0 - MARGIN * bw), max(0.0, y0 - MARGIN * bh)
        x1, y1 = min(image.width, x1 + MARGIN * bw), min(image.height, y1 + MARGIN * bh)
        box = (int(x0), int(y0), max(int(x0) + 1, int(np.ceil(x1))),
               max(int(y0) + 1, int(np.ceil(y1))))  # fmt: skip
        for meta, key in ((cls, "classify"), (emb, "embed")):
            spec = meta.preprocess
            pixels = np.asarray(image.resize((spec.width, spec.height), Image.BILINEAR, box=box))
            x = np.empty((1, *spec.input_shape), np.float32)
            normalize_into(pixels, x[0], spec)
            out = sessions[meta.name].run(None, {sessions[meta.name].get_inputs()[0].name: x})
            if key == "classify":
                probs = softmax(out[0][0].astype(np.float64))
                top = np.argsort(-probs, kind="stable")[:2]
                got = crop["classify"]["top_k"]
                assert [g["index"] for g in got] == [int(i) for i in top]
                np.testing.assert_allclose([g["score"] for g in got], probs[top], rtol=1e-5)
            else:
                # independent of the runtime: the channel means of the input, times W
                want = x[0].astype(np.float64).mean(axis=(1, 2)) @ w.astype(np.float64)
                got = np.array(crop["embed"]["embedding"])
                # the direction: the embed head may L2-normalise (its default on main)
                np.testing.assert_allclose(got / np.linalg.norm(got),
                                           want / np.linalg.norm(want), atol=1e-5)  # fmt: skip
                assert crop["embed"]["dim"] == EMBED_DIM
                cos = 1 - vectors @ got / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(got))
                order = np.argsort(cos, kind="stable")[:2]
                assert [n["name"] for n in crop["who"]["neighbours"]] == [names[i] for i in order]
                np.testing.assert_allclose(
                    [n["distance"] for n in crop["who"]["neighbours"]], cos[order], atol=1e-5
                )
    assert [t["index"] for t in answer["whole"]["top_k"]] and "best" in answer


def _serve(path: Path, cache) -> ServerThread:
    cfg = load_config(path)
    cfg = dataclasses.replace(cfg, port=free_port(), cache_dir=str(cache))
    return ServerThread(cfg)


def _check_photos(url: str, built, data_dir: Path, n: int = 2) -> dict:
    cache, w, gallery = built
    photos = [data_dir / "images/small" / f for f in ("person.jpg", "dog.jpg")][:n]
    assert len(photos) == n
    with httpx.Client(base_url=url, timeout=120) as c:
        for p in photos:
            r = c.post("/v1/pipelines/people:predict", content=p.read_bytes())
            assert r.status_code == 200, r.text
            _expected(cache, w, gallery, p.read_bytes(), r.json())
            timing = r.headers["server-timing"]
            assert "broker;dur=" in timing and "decode;dur=" in timing
            # each step named in the stages it spent time in
            infer = next(e for e in timing.split(", ") if e.startswith("infer;"))
            assert all(f"{step}=" in infer for step in ("detect", "classify", "embed", "whole"))
        return c.get("/v1/pipelines/people").json()


def test_a_yaml_graph_over_the_inprocess_broker_answers_as_its_models_one_by_one(
    built, data_dir, tmp_path
):
    cache, _, gallery = built
    with _serve(_config(tmp_path, "inprocess://", 1, gallery), cache) as server:
        doc = _check_photos(server.url, built, data_dir)
        metrics = httpx.get(server.metrics_url or f"{server.url}/metrics").text
    assert 'cvserve_pipeline_step_items_total{pipeline="people",step="classify"}' in metrics
    assert 'cvserve_pipeline_step_seconds_count{part="broker",pipeline="people",step="embed"}' in (
        metrics
    )
    steps = {s["name"]: s for s in doc["steps"]}
    assert steps["classify"]["via"] == "broker" and steps["classify"]["per_crop_of"] == "crops"
    assert steps["classify"]["stats"]["items"] >= 2  # crops of both photos went through
    assert steps["whole"]["stats"]["calls"] == 2 and steps["whole"]["via"] == "inprocess"
    assert steps["who"]["type"] == "answer" and steps["embed"]["type"] == "vector"


def _worker(path: Path, stage: str, url: str, cache) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cvserve", "worker", "--config", str(path), "--pipeline",
         "people", "--stage", stage, "--broker", url, "--cache-dir", str(cache)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_yaml_graph_over_redis_with_remote_workers(built, data_dir, tmp_path, redis_server):
    cache, _, gallery = built
    url = f"{redis_server.url}?prefix=g{free_port()}:"
    path = _config(tmp_path, url, 0, gallery)  # no workers in the server: only remote ones
    workers = [_worker(path, stage, url, cache) for stage in ("classify", "embed")]
    try:
        for w in workers:
            deadline = time.monotonic() + 120
            line, said = "", []
            while not line.startswith("worker: ") and time.monotonic() < deadline:
                line = w.stdout.readline()
                said.append(line)
                assert line or w.poll() is None, f"worker exited: {''.join(said)}"
        with _serve(path, cache) as server:
            _check_photos(server.url, built, data_dir)
    finally:
        stop_processes(*workers)


@pytest.mark.parametrize(
    ("steps", "error"),
    [
        ("[{name: a, model: tiny-resnet, input: b}, {name: b, model: tiny-resnet, input: a}]",
         "step 'a': is part of a cycle"),
        ("[{name: a, model: no-such-model}]", "step 'a': model 'no-such-model'"),
        ("[{name: a, model: tiny-resnet}, {name: c, crop: a}]",
         "step 'c': crops need boxes"),
        ("[{name: a, model: tiny-resnet}, {name: g, gallery: a, file: x.npz}]",
         "step 'g': a gallery reads embeddings"),
        ("[{name: a, model: tiny-resnet, input: nowhere}]", "step 'a': reads 'nowhere'"),
        ("[{name: a, model: tiny-resnet, via: post}]", "step 'a': via must be one of"),
        ("[{name: a, crop: b, square: 1, colour: red}]", "step 'a': unknown keys ['colour']"),
    ],
)  # fmt: skip
def test_an_invalid_graph_is_one_line_naming_the_step(built, tmp_path, steps, error):
    from cvserve.serving.pipelines.engine import load_graph

    cache, _, _ = built
    path = tmp_path / "bad.yaml"
    path.write_text(f"pipelines:\n  - name: p\n    steps: {steps}\n")
    with pytest.raises(ConfigError) as e:
        load_graph(load_config(path).pipelines[0], str(cache))
    assert error in str(e.value) and "\n" not in str(e.value)


def test_the_detect_embed_preset_names_each_crop_from_the_gallery(built, data_dir, tmp_path):
    """The paper's pipeline as a preset: detect -> crops (10% margin, square) -> embed over
    the broker -> the gallery's nearest names, each crop's answer nested in its entry."""
    cache, w, gallery = built
    path = tmp_path / "faces.yaml"
    path.write_text(
        "pipelines:\n  - name: faces\n    kind: detect-embed\n    params: {detector: tiny-yolos, "
        f"embedder: standin-embed, objects: 3, gallery: '{gallery}', neighbours: 2}}\n"
    )
    photo = (data_dir / "images/small/person.jpg").read_bytes()
    with _serve(path, cache) as server:
        r = httpx.post(f"{server.url}/v1/pipelines/faces:predict", content=photo, timeout=120)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert 0 < len(answer["crops"]) <= 3
    with np.load(gallery) as f:
        names = set(f["names"])
    for crop in answer["crops"]:
        assert len(crop["embed"]["embedding"]) == EMBED_DIM
        got = crop["gallery"]["neighbours"]
        assert len(got) == 2 and {n["name"] for n in got} <= names
        assert got[0]["distance"] <= got[1]["distance"]


def test_ocr_steps_all_in_process_answer_as_the_preset_over_the_broker(data_dir, tmp_path):
    """The ``ocr`` preset's steps with ``rec`` in the request's thread instead of behind
    the broker: the same lines, boxes and scores."""
    pytest.importorskip("cv2", reason="the ocr ops need the ocr extra")
    path = tmp_path / "ocr.yaml"
    path.write_text(
        "pipelines:\n"
        "  - {name: ocr}\n"
        "  - name: here\n    answer: ocr\n    steps:\n"
        "      - {name: det, op: ocr_det}\n"
        "      - {name: regions, crop: det, output: false}\n"
        "      - {name: rec, op: ocr_rec, input: regions}\n"
    )
    cfg = dataclasses.replace(load_config(path), port=free_port())
    images = sorted((data_dir / "ocr").glob("*"))[:2]
    assert images
    with ServerThread(cfg) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        for image in images:
            a = c.post("/v1/pipelines/ocr:predict", content=image.read_bytes())
            b = c.post("/v1/pipelines/here:predict", content=image.read_bytes())
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            want, got = a.json(), b.json()
            assert want["regions"] == got["regions"] > 0
            # the recognizer pads the crops of one call to a common width: calls made of
            # other crops (the broker's batches of 16) move scores by up to ~1%
            assert [ln["box"] for ln in want["lines"]] == [ln["box"] for ln in got["lines"]]
            same = [
                a["text"] == b["text"] for a, b in zip(want["lines"], got["lines"], strict=True)
            ]
            assert np.mean(same) >= 0.9
            np.testing.assert_allclose([ln["score"] for ln in want["lines"]],
                                       [ln["score"] for ln in got["lines"]], atol=0.03)  # fmt: skip
