"""Zoo models for dense tasks: segmentation (SegFormer), detection (RT-DETR), depth.

Tiny variants are built and checked against torch; full-size entries only have their
preprocessing checked (building them takes minutes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cvserve.models import build, store  # noqa: E402
from cvserve.models.zoo import ZOO  # noqa: E402

MAX_REL = 1e-4

# name -> (task, {output: shape at batch 2})
TINY = {
    "tiny-segformer": ("segment", {"logits": (2, 5, 16, 16)}),
    "tiny-rtdetr": ("detect", {"logits": (2, 10, 5), "pred_boxes": (2, 10, 4)}),
    "tiny-depth": ("depth", {"predicted_depth": (2, 56, 56)}),
}


def _processor(name: str):
    entry = ZOO[name]
    return build._processor_class(transformers, entry.processor_class)(**entry.processor)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks-zoo")
    for name in TINY:
        build.build_zoo_model(name, root)
    return root


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_onnx_matches_torch_at_batch_2(tiny_store: Path, name: str) -> None:
    task, shapes = TINY[name]
    meta = store.load_meta(name, tiny_store)
    assert meta.task == task == ZOO[name].task
    assert meta.output_names == list(shapes) == list(ZOO[name].outputs)

    spec = meta.preprocess
    x = np.random.default_rng(0).standard_normal((2, 3, spec.height, spec.width))
    x = x.astype(np.float32)
    session = ort.InferenceSession(
        str(store.model_path(meta, tiny_store)), providers=["CPUExecutionProvider"]
    )
    assert [o.name for o in session.get_outputs()] == list(shapes)
    got = session.run(None, {meta.input_name: x})

    model, _ = build.create_zoo_model(name)  # same seed, same weights as the build
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x), return_dict=True)
    for key, g in zip(shapes, got, strict=True):
        ref = getattr(out, key).numpy()
        assert g.shape == ref.shape == shapes[key], key
        rel = float(np.abs(g - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
        assert rel < MAX_REL, (key, rel)


def test_tiny_build_records_gflops(tiny_store: Path) -> None:
    for name in TINY:
        meta = store.load_meta(name, tiny_store)
        d = store.describe(meta, tiny_store)
        assert d["gflops"] == meta.extra["gflops"]
        assert isinstance(d["gflops"], float) and d["gflops"] > 0
        assert d["params"] and d["params"] > 0


def test_count_gflops_counts_two_flops_per_mac() -> None:
    # one 3x3 conv, 3 -> 8 channels, padding 1, on 16x16: 16*16*8*3*3*3 MACs
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, pixel_values):
            return self.conv(pixel_values)

    assert build.count_gflops(Wrapped(), (1, 3, 16, 16)) == pytest.approx(
        2 * 16 * 16 * 8 * 27 / 1e9, rel=1e-3
    )


# name -> (height, width, interpolation, mean, std, processor class)
FULL = {
    "segformer-b0": (512, 512, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "SegformerImageProcessor"),
    "rtdetr-r18": (640, 640, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "RTDetrImageProcessor"),
    "depth-anything-small": (518, 518, "bicubic", IMAGENET_MEAN, IMAGENET_STD, "DPTImageProcessor"),
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_entry_spec_matches_its_processor(name: str) -> None:
    h, w, interp, mean, std, kind = FULL[name]
    processor = _processor(name)
    d = processor.to_dict()
    spec = build.preprocess_spec_from_hf(processor)
    assert (spec.height, spec.width) == (d["size"]["height"], d["size"]["width"]) == (h, w)
    assert spec.resize_mode == "direct"
    assert spec.interpolation == interp
    assert spec.rescale == pytest.approx(1 / 255)
    assert spec.mean == pytest.approx(mean)
    assert spec.std == pytest.approx(std)
    if d.get("do_normalize", True):
        assert spec.mean == pytest.approx(tuple(d["image_mean"]))
        assert spec.std == pytest.approx(tuple(d["image_std"]))
    assert spec.extra["hf_processor"] == kind


@pytest.mark.parametrize("name", ["segformer-b0", "rtdetr-r18"])
def test_full_entry_matches_the_default_hf_processor(name: str) -> None:
    """The zoo's settings are the HF defaults of these processors (the checkpoints' own)."""
    default = build._processor_class(transformers, ZOO[name].processor_class)()
    assert build.preprocess_spec_from_hf(default) == build.preprocess_spec_from_hf(_processor(name))


def test_dpt_processor_keeping_aspect_ratio_is_rejected() -> None:
    cls = build._processor_class(transformers, "DPTImageProcessor")
    kwargs = {**ZOO["depth-anything-small"].processor, "keep_aspect_ratio": True}
    with pytest.raises(ValueError, match="keep_aspect_ratio"):
        build.preprocess_spec_from_hf(cls(**kwargs))


def test_dpt_sizes_round_to_the_multiple() -> None:
    cls = build._processor_class(transformers, "DPTImageProcessor")
    kwargs = {**ZOO["depth-anything-small"].processor, "size": {"height": 520, "width": 510}}
    spec = build.preprocess_spec_from_hf(cls(**kwargs))
    assert (spec.height, spec.width) == (518, 504)


def test_entries_have_tasks_and_outputs() -> None:
    assert ZOO["segformer-b0"].outputs == ("logits",)
    assert ZOO["rtdetr-r18"].outputs == ("logits", "pred_boxes")
    assert ZOO["depth-anything-small"].outputs == ("predicted_depth",)
    assert {ZOO[n].task for n in FULL} == {"segment", "detect", "depth"}
    assert all(ZOO[n].tiny for n in TINY) and not any(ZOO[n].tiny for n in FULL)
