"""Building ONNX models from HF configs and folders: numerics, preprocessing, atomicity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec  # noqa: E402
from cvserve.models import build, store  # noqa: E402

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _pil_processor(name: str, **kwargs):
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": x})[0]


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


# --- preprocessing spec ---------------------------------------------------------------
def _apply_spec(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Our reading of a spec, in PIL + float64 numpy, independent of transformers."""
    f = _PIL_FILTERS[spec.interpolation]
    if spec.resize_mode == "direct":
        img = img.resize((spec.width, spec.height), f)
    else:
        w, h = img.size
        s = spec.resize_shortest
        # HF keeps the aspect ratio and truncates the longer side
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        img = img.resize((nw, nh), f)
        top, left = (nh - spec.height) // 2, (nw - spec.width) // 2
        img = img.crop((left, top, left + spec.width, top + spec.height))
    x = np.asarray(img, dtype=np.float64) * spec.rescale
    x = (x - np.array(spec.mean)) / np.array(spec.std)
    return x.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth, non-square test image (smooth so resampling differences stay small)."""
    yy, xx = np.mgrid[0:301, 0:419]
    rgb = np.stack([xx * 255 / 418, yy * 255 / 300, (xx + yy) * 255 / 719], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected"),
    [
        (  # microsoft/resnet-50
            "ConvNextImageProcessor",
            dict(
                size={"shortest_edge": 224},
                crop_pct=0.875,
                resample=3,
                image_mean=list(IMAGENET_MEAN),
                image_std=list(IMAGENET_STD),
            ),
            dict(
                height=224,
                width=224,
                resize_mode="shortest_edge_crop",
                resize_shortest=256,
                interpolation="bicubic",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
            ),
        ),
        (  # ConvNext at 384 and above warps to a square
            "ConvNextImageProcessor",
            dict(size={"shortest_edge": 384}),
            dict(height=384, width=384, resize_mode="direct", interpolation="bicubic"),
        ),
        (  # google/vit-base-patch16-224
            "ViTImageProcessor",
            dict(size={"height": 224, "width": 224}),
            dict(
                height=224,
                width=224,
                resize_mode="direct",
                interpolation="bilinear",
                mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5),
            ),
        ),
        (  # google/mobilenet_v2_1.0_224
            "MobileNetV2ImageProcessor",
            dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
            dict(
                height=224,
                width=224,
                resize_mode="shortest_edge_crop",
                resize_shortest=256,
                interpolation="bilinear",
                mean=(0.5, 0.5, 0.5),
            ),
        ),
        (  # non-square crop, no normalization, no rescale
            "MobileNetV2ImageProcessor",
            dict(
                size={"shortest_edge": 100},
                crop_size={"height": 96, "width": 64},
                do_normalize=False,
                do_rescale=False,
                resample=0,
            ),
            dict(
                height=96,
                width=64,
                resize_shortest=100,
                interpolation="nearest",
                rescale=1.0,
                mean=(0.0, 0.0, 0.0),
                std=(1.0, 1.0, 1.0),
            ),
        ),
    ],
)
def test_spec_from_hf_processor(photo: Image.Image, cls: str, kwargs: dict, expected: dict):
    processor = _pil_processor(cls, **kwargs)
    spec = build.preprocess_spec_from_hf(processor)
    for key, value in expected.items():
        assert getattr(spec, key) == pytest.approx(value), key
    assert spec.rescale == pytest.approx(processor.rescale_factor if processor.do_rescale else 1.0)
    if processor.do_normalize:
        assert spec.mean == pytest.approx(tuple(processor.image_mean))
        assert spec.std == pytest.approx(tuple(processor.image_std))
    assert (spec.layout, spec.channel_order, spec.dtype) == ("NCHW", "RGB", "float32")

    # The pixels HF makes and the pixels our reading of the spec makes agree.
    hf = np.asarray(processor(photo, return_tensors="np")["pixel_values"][0], np.float64)
    ours = _apply_spec(photo, spec)
    assert hf.shape == ours.shape == (3, spec.height, spec.width)
    tol = 1e-4 * max(1.0, float(np.abs(ours).max()))
    assert np.abs(hf - ours).max() < tol


def test_spec_rejects_processors_without_a_fixed_size() -> None:
    with pytest.raises(ValueError, match="does not resize"):
        build.preprocess_spec_from_hf(_pil_processor("ViTImageProcessor", do_resize=False))
    with pytest.raises(ValueError, match="no fixed size"):
        build.preprocess_spec_from_hf(
            _pil_processor(
                "MobileNetV2ImageProcessor", size={"shortest_edge": 256}, do_center_crop=False
            )
        )


def test_labels_from_config() -> None:
    cfg = transformers.ResNetConfig(num_labels=3)
    assert build.labels_from_config(cfg) == ["class_0", "class_1", "class_2"]
    cfg = transformers.ResNetConfig(id2label={0: "cat", 1: "dog"})
    assert build.labels_from_config(cfg) == ["cat", "dog"]


# --- zoo builds -----------------------------------------------------------------------
def test_tiny_resnet_onnx_matches_torch_at_batch_1_and_3(built_cache: Path) -> None:
    meta = store.load_meta("tiny-resnet", built_cache)
    model, processor = build.create_zoo_model("tiny-resnet")  # same seed, same weights
    assert meta.input_shape == [None, 3, 32, 32]
    assert (meta.input_name, meta.output_names) == ("pixel_values", ["logits"])
    assert meta.preprocess == build.preprocess_spec_from_hf(processor)
    assert (meta.preprocess.resize_shortest, meta.preprocess.height) == (36, 32)
    assert meta.labels == [f"class_{i}" for i in range(10)]
    assert meta.params == sum(p.numel() for p in model.parameters())
    assert 0 <= meta.extra["export_check_max_abs"] < 1e-4

    rng = np.random.default_rng(7)
    path = store.model_path(meta, built_cache)
    for batch in (1, 3):
        x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
        got, ref = _run_onnx(path, x), _torch_logits(model, x)
        assert got.shape == (batch, 10)
        assert np.abs(got - ref).max() < 1e-4
        assert np.abs(ref).max() > 1e-3  # the comparison is not between two zero tensors


def test_tiny_vit_builds_in_process_with_a_direct_resize(tmp_path: Path) -> None:
    lines: list[str] = []
    meta = build.build_zoo_model("tiny-vit", tmp_path, progress=lines.append)
    assert lines == [
        "building tiny-vit: creating model",
        "building tiny-vit: exporting ONNX",
        "building tiny-vit: verifying",
        lines[-1],
    ]
    assert lines[-1].startswith("building tiny-vit: done in ")
    assert meta.preprocess.resize_mode == "direct"
    assert store.load_meta("tiny-vit", tmp_path) == meta

    model, _ = build.create_zoo_model("tiny-vit")
    x = np.random.default_rng(3).normal(size=(3, 3, 32, 32)).astype(np.float32)
    got = _run_onnx(store.model_path(meta, tmp_path), x)
    assert np.abs(got - _torch_logits(model, x)).max() < 1e-4


def _built(name: str, cache: Path) -> bool:
    return next(e for e in store.list_models(cache) if e.name == name).built


def test_failed_export_leaves_no_file_and_unbuilds_an_old_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c"
    build.build_zoo_model("tiny-resnet", cache)
    assert _built("tiny-resnet", cache)

    def crash(model, args, f, **kwargs):
        Path(f).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", crash)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        build.build_zoo_model("tiny-resnet", cache)
    folder = cache / "models" / "tiny-resnet"
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]  # old graph, no sidecar
    assert not _built("tiny-resnet", cache)


def test_export_that_disagrees_with_torch_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "MAX_EXPORT_REL_ERROR", -1.0)
    with pytest.raises(build.BuildError, match="disagrees with torch"):
        build.build_zoo_model("tiny-resnet", tmp_path)
    assert not (tmp_path / "models" / "tiny-resnet" / "model.onnx").exists()
    assert list((tmp_path / "models" / "tiny-resnet").iterdir()) == []


def test_a_wrong_export_fails_saying_which_answers_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph is exported with two classes' weights swapped: a real, wrong ONNX file."""
    real_export = torch.onnx.export

    def export_swapped(model, args, f, **kwargs):
        fc = model.inner.classifier[1]
        with torch.no_grad():
            saved = fc.weight.clone(), fc.bias.clone()
            x = args[0]
            best = int(model(torch.randn(2, *x.shape[1:], generator=_seed(1)))[0].argmax())
            other = (best + 5) % fc.weight.shape[0]
            fc.weight[[best, other]] = saved[0][[other, best]] * 3
            fc.bias[[best, other]] = saved[1][[other, best]]
        try:
            return real_export(model, args, f, **kwargs)
        finally:
            with torch.no_grad():
                fc.weight.copy_(saved[0])
                fc.bias.copy_(saved[1])

    monkeypatch.setattr(torch.onnx, "export", export_swapped)
    with pytest.raises(build.BuildError) as e:
        build.build_zoo_model("tiny-resnet", tmp_path)
    msg = str(e.value)
    assert msg.startswith("exported ONNX disagrees with torch: image ")
    assert "classes differ" in msg or "score is" in msg, msg
    assert not (tmp_path / "models" / "tiny-resnet" / "model.onnx").exists()


def _seed(n: int):
    return torch.Generator().manual_seed(n)


# --- real weights from a local folder ---------------------------------------------------
@pytest.fixture
def hf_dir(tmp_path: Path) -> tuple[Path, object]:
    """A save_pretrained folder: tiny ResNet with named classes and its own preprocessing."""
    config = transformers.ResNetConfig(
        layer_type="basic",
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )
    torch.manual_seed(1234)
    model = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():  # weights no fresh random init would produce
        model.classifier[1].weight.mul_(7.0)
        model.classifier[1].bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    folder = tmp_path / "my-resnet"
    model.save_pretrained(folder)
    _pil_processor(
        "ConvNextImageProcessor",
        size={"shortest_edge": 48},
        crop_pct=0.75,
        resample=2,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
    ).save_pretrained(folder)
    return folder, model


def test_build_from_hf_dir_uses_the_folders_weights_labels_and_preprocessing(
    hf_dir: tuple[Path, object], tmp_path: Path
) -> None:
    folder, model = hf_dir
    meta = build.build_from_hf_dir(folder, "my-resnet", tmp_path / "cache")

    assert meta.labels == ["cat", "dog", "bird"]
    assert meta.source == f"hf-dir:{folder.resolve()}"
    spec = meta.preprocess
    assert (spec.height, spec.width, spec.resize_shortest) == (48, 48, 64)  # int(48 / 0.75)
    assert spec.interpolation == "bilinear"
    assert spec.mean == pytest.approx((0.1, 0.2, 0.3))
    assert spec.std == pytest.approx((0.4, 0.5, 0.6))
    assert meta.input_shape == [None, 3, 48, 48]

    x = np.random.default_rng(5).normal(size=(2, 3, 48, 48)).astype(np.float32)
    got = _run_onnx(store.model_path(meta, tmp_path / "cache"), x)
    assert np.abs(got - _torch_logits(model, x)).max() < 1e-4
    entry = next(e for e in store.list_models(tmp_path / "cache") if e.name == "my-resnet")
    assert entry.built and entry.source.startswith("hf-dir:")


def test_build_from_dir_through_the_child_process(
    hf_dir: tuple[Path, object], tmp_path: Path
) -> None:
    folder, _ = hf_dir
    lines: list[str] = []
    meta = store.build_from_dir(folder, cache=tmp_path / "c", progress=lines.append)
    assert meta.name == "my-resnet" and meta.labels == ["cat", "dog", "bird"]
    assert lines[-1].startswith("building my-resnet: done in ")


def test_build_from_hf_dir_needs_the_preprocessor_config(
    hf_dir: tuple[Path, object], tmp_path: Path
) -> None:
    folder, _ = hf_dir
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(build.BuildError, match="preprocessor_config.json"):
        build.build_from_hf_dir(folder, "x", tmp_path)
    with pytest.raises(build.BuildError, match="no config.json"):
        build.build_from_hf_dir(tmp_path, "x", tmp_path)


def test_child_entry_point_reports_one_line_errors(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cvserve.models.build", "nope", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines() == [
        "error: unknown model 'nope'; available: " + ", ".join(sorted(build.ZOO))
    ]


# --- code in a model folder never runs --------------------------------------------------
def _plant_remote_code(folder: Path, marker: Path, model_type: str | None = None) -> None:
    """An auto_map in config.json (and preprocessor_config.json) naming a .py file in the
    folder that writes ``marker`` when imported."""
    import json

    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    code += "from transformers import PretrainedConfig, PreTrainedModel\n"
    code += "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    code += "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    (folder / "evil.py").write_text(code)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    if model_type is not None:
        cfg["model_type"] = model_type
    cfg["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForImageClassification": "evil.EvilModel",
    }
    cfg_path.write_text(json.dumps(cfg))
    pp = folder / "preprocessor_config.json"
    if pp.exists():
        d = json.loads(pp.read_text())
        d["auto_map"] = {"AutoImageProcessor": "evil.EvilConfig"}
        pp.write_text(json.dumps(d))


def test_a_folder_that_needs_its_own_code_is_refused_without_running_it(
    tmp_path: Path,
) -> None:
    folder, marker = tmp_path / "evil", tmp_path / "RAN"
    folder.mkdir()
    _plant_remote_code(folder, marker, model_type="evil")
    with pytest.raises(build.BuildError, match="needs Python code from the folder"):
        build.build_from_hf_dir(folder, "evil", tmp_path / "cache")
    assert not marker.exists()
    # Through the child process with a "y" waiting on stdin, as `echo y | cvserve ...`.
    run = subprocess.run(
        [sys.executable, "-m", "cvserve.models.build", "--from-dir", str(folder)]
        + ["--cache-dir", str(tmp_path / "cache")],
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    assert "needs Python code from the folder" in run.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_an_auto_map_beside_a_known_architecture_is_ignored(
    hf_dir: tuple[Path, object], tmp_path: Path
) -> None:
    folder, _ = hf_dir
    marker = tmp_path / "RAN"
    _plant_remote_code(folder, marker)  # model_type stays "resnet"
    meta = build.build_from_hf_dir(folder, "my-resnet", tmp_path / "cache")
    assert meta.labels == ["cat", "dog", "bird"]
    assert not marker.exists()
