"""Bring your own model: HF folders of every task (and timm classifiers, in test_timm.py)
built with ``build_from_hf_dir``, served, and compared on the shared photos with what the
model's own library answers: transformers' image processor, the model, and its
``post_process_*`` function.

The folders are tiny ``save_pretrained`` models (random init, saved: to cvserve they are
real weights from a folder). The server decodes with ``decoder="pil"`` (full-size decode,
as the library does); the default ``pil-reduced`` decodes JPEGs at reduced scale, faster
and not bit-equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cvserve.config import ModelConfig, ServerConfig  # noqa: E402
from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cvserve.models import build, hf, store  # noqa: E402
from cvserve.serving.process import ServerThread, free_port  # noqa: E402
from cvserve.tasks.encode import decode_array, decode_npz  # noqa: E402

PHOTOS = ("giraffe.jpg", "demo08.jpg", "dog.jpg")
LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "car", 4: "tree"}


def _pil(name: str, **kw) -> object:
    return hf.processor_class(transformers, name)(**kw)


def _save(folder: Path, model, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_folders(root: Path) -> dict[str, Path]:
    """One save_pretrained folder per HF family (tiny configs, seeded)."""
    torch.manual_seed(7)
    t = transformers
    common = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    out: dict[str, Path] = {}
    vit = t.ViTForImageClassification(
        t.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        )  # fmt: skip
    )
    vit_proc = _pil("ViTImageProcessor", size={"height": 32, "width": 32}, resample=2)
    out["classify"] = _save(root / "my-vit", vit.eval(), vit_proc)
    seg = t.SegformerForSemanticSegmentation(
        t.SegformerConfig(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[8, 16],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=16,
            **common,
        )  # fmt: skip
    )
    seg_proc = _pil("SegformerImageProcessor", size={"height": 64, "width": 64}, resample=2,
                    image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))  # fmt: skip
    out["segment"] = _save(root / "my-segformer", seg.eval(), seg_proc)
    from cvserve.models.zoo import ZOO

    det_cfg = dict(ZOO["tiny-rtdetr"].config, **common)
    det = t.RTDetrForObjectDetection(t.RTDetrConfig(**det_cfg))
    build._redraw_constant_weights(torch, det)
    det_proc = _pil("RTDetrImageProcessor", size={"height": 64, "width": 64}, resample=2,
                    do_normalize=False, do_pad=False)  # fmt: skip
    out["detect"] = _save(root / "my-rtdetr", det.eval(), det_proc)
    dep = t.DepthAnythingForDepthEstimation(t.DepthAnythingConfig(**ZOO["tiny-depth"].config))
    dep_proc = _pil("DPTImageProcessor", **ZOO["tiny-depth"].processor)
    out["depth"] = _save(root / "my-depth", dep.eval(), dep_proc)
    clip = t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(**ZOO["tiny-clip"].config))
    clip_proc = _pil("CLIPImageProcessor", **ZOO["tiny-clip"].processor)
    out["embed"] = _save(root / "my-clip", clip.eval(), clip_proc)
    dino = t.Dinov2Model(t.Dinov2Config(**ZOO["tiny-dinov2"].config))
    dino_proc = _pil("BitImageProcessor", **ZOO["tiny-dinov2"].processor)
    out["embed-dinov2"] = _save(root / "my-dinov2", dino.eval(), dino_proc)
    return out


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    folders = make_folders(root)
    cache = root / "cache"
    metas = {k: build.build_from_hf_dir(f, f.name, cache) for k, f in folders.items()}
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        models=tuple(ModelConfig(m.name, decoder="pil") for m in metas.values()),
    )
    with ServerThread(cfg) as srv:
        yield srv, folders, metas


def _library(folder: Path):
    """The model and the PIL image processor as transformers loads them from the folder."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()
    proc = hf.load_image_processor(transformers, str(folder))
    return model, proc


def _photo(data_dir: Path, name: str) -> tuple[bytes, Image.Image]:
    path = data_dir / "images" / "small" / name
    return path.read_bytes(), Image.open(path).convert("RGB")


def _post(srv, model: str, data: bytes, query: str = "", **kw) -> httpx.Response:
    r = httpx.post(f"{srv.url}/v1/models/{model}:predict{query}", content=data, timeout=60, **kw)
    assert r.status_code == 200, r.text
    return r


def both(own, data_dir: Path, photo: str, kind: str, query: str = "", **kw):
    """(the photo, the library's processor, its model outputs, cvserve's response)."""
    srv, folders, metas = own
    data, im = _photo(data_dir, photo)
    model, proc = _library(folders[kind])
    with torch.no_grad():
        outputs = model(**proc(images=im, return_tensors="pt"))
    return im, proc, outputs, _post(srv, metas[kind].name, data, query, **kw)


def test_each_folder_builds_as_its_task_with_its_labels(own) -> None:
    _, _, metas = own
    assert {k: m.task for k, m in metas.items()} == {
        "classify": "classify",
        "segment": "segment",
        "detect": "detect",
        "depth": "depth",
        "embed": "embed",
        "embed-dinov2": "embed",
    }
    for k in ("classify", "segment", "detect"):
        assert metas[k].labels == list(LABELS.values())
    assert metas["depth"].labels == [] and metas["embed"].labels == []
    assert all(m.weights == "real" for m in metas.values())
    assert metas["embed"].output_names == ["image_embeds"]
    assert metas["embed-dinov2"].output_names == ["pooler_output"]


@pytest.mark.parametrize("photo", PHOTOS)
def test_classifier_answers_as_transformers(own, data_dir, photo) -> None:
    _, _, outputs, r = both(own, data_dir, photo, "classify", "?top_k=5")
    probs = torch.softmax(outputs.logits[0].double(), -1).numpy()
    got = r.json()["top_k"]
    want = np.argsort(-probs)
    assert got[0]["label"] == LABELS[int(want[0])]
    for g in got:
        assert abs(g["score"] - probs[g["index"]]) < 1e-4


@pytest.mark.parametrize("photo", PHOTOS)
def test_segmenter_answers_as_post_process_semantic_segmentation(own, data_dir, photo) -> None:
    im, proc, outputs, r = both(own, data_dir, photo, "segment")
    want = proc.post_process_semantic_segmentation(outputs, target_sizes=[im.size[::-1]])[0]
    got = decode_array(r.json()["mask"])
    assert got.shape == tuple(want.shape)
    agreement = float((got == want.numpy()).mean())
    assert agreement >= 0.99, agreement


@pytest.mark.parametrize("photo", PHOTOS)
def test_detector_answers_as_post_process_object_detection(own, data_dir, photo) -> None:
    im, proc, outputs, r = both(own, data_dir, photo, "detect", "?threshold=0&top_k=5")
    ref = proc.post_process_object_detection(outputs, threshold=0.0, target_sizes=[im.size[::-1]])
    ref = ref[0]
    order = torch.argsort(ref["scores"], descending=True)[:5]
    got = r.json()["detections"]
    assert len(got) == len(order)
    for g, i in zip(got, order.tolist(), strict=True):
        assert g["label"] == LABELS[int(ref["labels"][i])]
        assert abs(g["score"] - float(ref["scores"][i])) < 2e-3
        assert np.abs(np.array(g["box"]) - ref["boxes"][i].numpy()).max() < 1.0


@pytest.mark.parametrize("photo", PHOTOS)
def test_depth_model_answers_as_post_process_depth_estimation(own, data_dir, photo) -> None:
    npz = {"headers": {"accept": "application/x-npz"}}
    im, proc, outputs, r = both(own, data_dir, photo, "depth", **npz)
    want = proc.post_process_depth_estimation(outputs, target_sizes=[im.size[::-1]])
    want = want[0]["predicted_depth"].numpy()
    got = decode_npz(r.content)[1]["depth"]
    assert got.shape == want.shape
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < 1e-3, rel


@pytest.mark.parametrize("kind", ["embed", "embed-dinov2"])
@pytest.mark.parametrize("photo", PHOTOS)
def test_image_encoder_answers_as_transformers(own, data_dir, photo, kind) -> None:
    _, _, out, r = both(own, data_dir, photo, kind)
    want = (out.image_embeds if kind == "embed" else out.pooler_output)[0].double().numpy()
    want /= np.linalg.norm(want)
    body = r.json()
    assert set(body) >= {"embedding", "dim"}
    got = np.array(body["embedding"], dtype=np.float64)
    assert body["dim"] == got.size == want.size
    assert abs(np.linalg.norm(got) - 1) < 1e-6
    assert float(got @ want) > 0.9999


def test_served_model_and_list_say_the_weights_are_real(own) -> None:
    srv, _, metas = own
    d = httpx.get(f"{srv.url}/v1/models/{metas['segment'].name}").json()
    assert d["weights"] == "real" and d["task"] == "segment"
    cache = Path(srv.config.cache_dir)
    rows = {e.name: e for e in store.list_models(cache)}
    assert rows["my-segformer"].weights == "real" and rows["tiny-resnet"].weights == "random"


# --- refusing what cannot be served -------------------------------------------------------
def test_a_folder_of_an_architecture_it_cannot_serve_is_refused_in_one_line(tmp_path) -> None:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)  # fmt: skip
    folder = tmp_path / "bert"
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    _pil("ViTImageProcessor", size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(hf.UnsupportedModel) as e:
        build.build_from_hf_dir(folder, "bert", tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "BertForSequenceClassification" in msg
    assert "is not one cvserve serves" in msg


def test_a_config_without_architectures_is_refused(tmp_path) -> None:
    folder = tmp_path / "noarch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    _pil("ViTImageProcessor").save_pretrained(folder)
    with pytest.raises(hf.UnsupportedModel, match="names no architecture"):
        build.build_from_hf_dir(folder, "noarch", tmp_path / "cache")


# --- the hub, through an offline cache ----------------------------------------------------
def _lay_out_hub_cache(hf_home: Path, repo: str, folder: Path, commit: str) -> None:
    """The HF hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_from_hub_works_offline_from_a_populated_cache(tmp_path, monkeypatch) -> None:
    folder = make_folders(tmp_path / "src")["segment"]
    hf_home = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _lay_out_hub_cache(hf_home, "someone/seg-tiny", folder, commit)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lines: list[str] = []
    meta = store.build_from("hub", "someone/seg-tiny", "seg-tiny", tmp_path / "c", lines.append)
    assert meta.task == "segment" and meta.weights == "real"
    assert meta.source == "hf-hub:someone/seg-tiny" and meta.labels == list(LABELS.values())
    # a revision pinned by commit
    meta = store.build_from("hub", f"someone/seg-tiny@{commit}", "seg-pinned", tmp_path / "c")
    assert meta.source == f"hf-hub:someone/seg-tiny@{commit}"
    # a repo the cache does not hold: one clear line, nothing fetched
    with pytest.raises(store.ModelBuildError) as e:
        store.build_from("hub", "someone/absent", "absent", tmp_path / "c")
    assert "not in the HuggingFace cache" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert "\n" not in str(e.value)
