"""timm classifiers: built from a timm name (random weights) or a timm checkpoint folder,
preprocessed as timm's own eval transform does, served, answering as timm would.

timm imports torchvision; the registry's torchvision is built for the CUDA torch and
imports beside torch+cpu only through :mod:`cvserve.models.torchvision_compat` (installed
by tests/conftest.py and the build child). The zoo extra installs both.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision", reason="timm needs torchvision (the zoo extra installs it)")
timm = pytest.importorskip("timm", reason="timm is in the zoo extra")

pytest.importorskip("timm.data")

from cvserve.config import ModelConfig, ServerConfig  # noqa: E402
from cvserve.images.preprocess import Preprocessor  # noqa: E402
from cvserve.models import build, store, timm_build  # noqa: E402
from cvserve.serving.process import ServerThread, free_port  # noqa: E402

PHOTOS = ("giraffe.jpg", "demo08.jpg", "dog.jpg", "eagle.jpg", "darknet_dog.jpg")
LABELS = ["cat", "dog", "bird", "car", "tree"]


def _photos(data_dir: Path) -> list[Path]:
    return [data_dir / "images" / "small" / p for p in PHOTOS]


@pytest.mark.parametrize(
    "name", ["test_resnet", "test_efficientnet", "test_vit", "resnet50", "vit_base_patch16_224"]
)
def test_served_input_matches_timms_own_transform(data_dir, name) -> None:
    """cvserve's input tensor against timm's create_transform(**data_config), per photo:
    within one 8-bit level (1/255/std), PSNR over 60 dB (measured: >= 69.5 dB)."""
    model = timm.create_model(name, pretrained=False)
    cfg = timm_build.data_config(model)
    spec = timm_build.spec_from_timm(cfg)
    transform = timm.data.create_transform(**cfg)
    pre = Preprocessor(spec, decoder="pil")
    one_level = 1 / 255 / min(spec.std) + 1e-6
    for path in _photos(data_dir):
        got = np.zeros(spec.input_shape, np.float32)
        pre.run(path.read_bytes(), got)
        want = transform(Image.open(path).convert("RGB")).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= one_level, path.name
        err = (got - want) * np.array(spec.std, np.float32).reshape(3, 1, 1) * 255
        psnr = 10 * np.log10(255**2 / max(float((err**2).mean()), 1e-12))
        assert psnr > 60, (path.name, psnr)


def test_spec_from_timm_data_config() -> None:
    spec = timm_build.spec_from_timm(
        {
            "input_size": (3, 224, 224),
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": (0.1, 0.2, 0.3),
            "std": (0.4, 0.5, 0.6),
            "crop_mode": "center",
        }  # fmt: skip
    )
    assert (spec.height, spec.width, spec.resize_shortest) == (224, 224, 256)
    assert spec.resize_mode == "shortest_edge_crop" and spec.interpolation == "bicubic"
    assert spec.mean == (0.1, 0.2, 0.3) and spec.extra["crop_offset"] == "round"
    with pytest.raises(timm_build.TimmError, match="crop_mode 'border'"):
        timm_build.spec_from_timm(
            {"input_size": (3, 8, 8), "mean": (0,) * 3, "std": (1,) * 3, "crop_mode": "border"}
        )


@pytest.fixture(scope="module")
def timm_served(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(LABELS))
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": LABELS}
    folder = root / "my-effnet"
    timm.models.save_for_hf(model, folder, model_config={"label_names": LABELS})
    cache = root / "cache"
    own = build.build_from_timm(str(folder), None, cache)
    named = build.build_from_timm("test_resnet", None, cache)
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        models=tuple(ModelConfig(m.name, decoder="pil") for m in (own, named)),
    )
    with ServerThread(cfg) as srv:
        yield srv, folder, own, named


def test_timm_folder_and_name_build_with_their_weights_and_labels(timm_served) -> None:
    _, folder, own, named = timm_served
    assert own.task == "classify" and own.weights == "real" and own.labels == LABELS
    assert own.source == f"timm-dir:{folder.resolve()}"
    assert named.weights == "random" and named.source == "timm-name:test_resnet"
    assert len(named.labels) == 1000
    cfg = json.loads((folder / "config.json").read_text())
    assert own.preprocess.height == cfg["pretrained_cfg"]["input_size"][1]


@pytest.mark.parametrize("photo", PHOTOS)
def test_timm_classifier_answers_as_timm(timm_served, data_dir, photo) -> None:
    srv, folder, own, _ = timm_served
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    path = data_dir / "images" / "small" / photo
    with torch.no_grad():
        logits = model(transform(Image.open(path).convert("RGB"))[None])[0]
    probs = torch.softmax(logits.double(), -1).numpy()
    r = httpx.post(
        f"{srv.url}/v1/models/{own.name}:predict?top_k=5", content=path.read_bytes(), timeout=60
    )
    assert r.status_code == 200, r.text
    top = r.json()["top_k"]
    assert top[0]["label"] == LABELS[int(probs.argmax())]
    for t in top:
        assert abs(t["score"] - probs[t["index"]]) < 1e-3


def test_unknown_timm_name_is_one_line(tmp_path) -> None:
    with pytest.raises(store.ModelBuildError) as e:
        store.build_from("timm", "no_such_model_x", "x", tmp_path)
    assert "neither a folder nor a timm model name" in str(e.value)
