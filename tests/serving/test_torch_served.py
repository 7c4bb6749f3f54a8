"""The two runtimes serve the same answers: each task's tiny zoo model built to ONNX and to a
``.pt2`` (``models build --pt2``), served side by side by onnxruntime and by torch, asked
about the shared photos. Top-5 equal (classify), boxes within 1 px (detect), class maps
>= 99.9% equal (segment). Also: ``models add FILE.pt2``, and the one-line errors of a
runtime asked for a file the model does not have."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cvserve.config import ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.encode import decode_array
from cvserve.trace import parse_server_timing

pytest.importorskip("torch", reason="the .pt2 path needs the zoo extra")
pytestmark = pytest.mark.zoo

MODELS = {"classify": "tiny-resnet", "segment": "tiny-segformer", "detect": "tiny-rtdetr"}


@pytest.fixture(scope="module")
def pt2_cache(tmp_path_factory):
    from cvserve.models.pt2 import ensure_pt2

    cache = tmp_path_factory.mktemp("pt2-cache")
    for name in MODELS.values():
        meta = ensure_pt2(name, cache)
        # RT-DETR's HF code fixes its batch size: that program takes batch 1 (the runtime
        # runs its batches image by image), the others any batch size
        assert meta.extra["pt2"]["dynamic_batch"] is (name != "tiny-rtdetr")
        assert meta.extra["pt2"]["check_onnx"]["rel"] < 1e-3
    return cache


@pytest.fixture(scope="module")
def both(pt2_cache):
    models = []
    for name in MODELS.values():
        for rt in ("onnxruntime", "torch"):
            models.append(ModelConfig(f"{name}-{rt}", model=name, runtime=rt))
    cfg = ServerConfig(port=free_port(), cache_dir=str(pt2_cache), models=tuple(models))
    with ServerThread(cfg) as srv:
        yield srv


def _photos(data_dir):
    return [data_dir / "images" / s / n for s, n in (
        ("small", "dog.jpg"), ("small", "giraffe.jpg"), ("medium", "demo01.jpg"),
        ("medium", "kite.jpg"), ("large", "jolla.jpg"))]  # fmt: skip


def _ask(c: httpx.Client, name: str, data: bytes, query: str = "") -> httpx.Response:
    r = c.post(f"/v1/models/{name}:predict{query}", content=data)
    assert r.status_code == 200, r.text
    return r


def test_both_runtimes_give_the_same_answers_on_the_shared_photos(both, data_dir):
    with httpx.Client(base_url=both.url, timeout=120) as c:
        for path in _photos(data_dir):
            data = path.read_bytes()
            m = MODELS["classify"]
            a, b = (_ask(c, f"{m}-{rt}", data, "?top_k=5") for rt in ("onnxruntime", "torch"))
            assert [x["index"] for x in a.json()["top_k"]] == [
                x["index"] for x in b.json()["top_k"]
            ]
            stages, bad = parse_server_timing(b.headers["server-timing"])
            assert bad == 0 and "infer" in stages

            m = MODELS["segment"]
            a, b = (decode_array(_ask(c, f"{m}-{rt}", data).json()["mask"])
                    for rt in ("onnxruntime", "torch"))  # fmt: skip
            assert a.shape == b.shape and (a == b).mean() >= 0.999, (path.name, (a == b).mean())

            m = MODELS["detect"]
            a, b = (_ask(c, f"{m}-{rt}", data, "?threshold=0&top_k=10").json()["detections"]
                    for rt in ("onnxruntime", "torch"))  # fmt: skip
            assert len(a) == len(b) > 0
            for da in a:  # the same detection (label and box within 1 px) on both
                assert any(db["label"] == da["label"] and
                           np.abs(np.subtract(db["box"], da["box"])).max() <= 1.0 for db in b), da  # fmt: skip


def test_the_torch_runtime_says_what_it_serves(both):
    with httpx.Client(base_url=both.url, timeout=60) as c:
        info = c.get(f"/v1/models/{MODELS['classify']}-torch").json()
    assert info["outputs"] == ["logits"]
    assert info["runtime"]["kind"] == "torch" and info["runtime"]["batch"] == "dynamic"


def test_a_user_pt2_is_added_and_served_and_onnxruntime_refuses_it(pt2_cache, tmp_path, data_dir):
    import torch

    from cvserve.cli import main
    from cvserve.models import store
    from cvserve.models.pt2 import Pt2Error, graph_path
    from cvserve.serving.model import _graph_file

    src = store.model_dir(MODELS["classify"], pt2_cache) / "model.pt2"
    mine = tmp_path / "mine.pt2"
    mine.write_bytes(src.read_bytes())
    assert main(["models", "add", str(mine), "--size", "32", "--resize", "36",
                 "--cache-dir", str(pt2_cache)]) == 0  # fmt: skip
    meta = store.load_meta("mine", pt2_cache)
    assert meta.input_shape == [None, 3, 32, 32] and meta.extra["pt2"]["file"] == "model.pt2"
    folder = store.model_dir("mine", pt2_cache)
    assert graph_path(meta, folder, "torch") == folder / "model.pt2"
    with pytest.raises(Pt2Error, match="serve it with --runtime torch"):
        _graph_file(meta, str(store.model_path(meta, pt2_cache)), ModelConfig("mine"))
    # a wrong size is refused with the reason, before anything is stored
    with pytest.raises(store.InvalidModel, match="axis 2"):
        from cvserve.images.spec import PreprocessSpec
        from cvserve.models.pt2 import add_pt2

        add_pt2(mine, "mine2", spec=PreprocessSpec(64, 64), cache=pt2_cache)
    assert torch.__version__  # the add ran in this process: torch was needed for it


def test_a_model_without_a_program_gets_a_one_line_error(model_cache):
    from cvserve.models import store
    from cvserve.models.pt2 import Pt2Error
    from cvserve.serving.model import _graph_file

    meta = store.load_meta("tiny-resnet", model_cache)
    meta.extra = {k: v for k, v in meta.extra.items() if k != "pt2"}
    with pytest.raises(Pt2Error, match="models build tiny-resnet --pt2"):
        _graph_file(
            meta, str(store.model_path(meta, model_cache)), ModelConfig("t", runtime="torch")
        )
