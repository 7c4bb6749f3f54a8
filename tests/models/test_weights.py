"""ModelMeta.weights: real, random or unknown, also for sidecars written before it existed."""

from __future__ import annotations

import pytest

from cvserve.images.spec import PreprocessSpec
from cvserve.models.metadata import ModelMeta, weights_line, weights_of_source


@pytest.mark.parametrize(
    ("source", "weights"),
    [
        ("zoo:resnet50", "random"),
        ("timm-name:resnet18", "random"),
        ("hf-dir:/x/my-model", "real"),
        ("hf-hub:org/name@main", "real"),
        ("timm-dir:/x/ckpt", "real"),
        ("user:/x/model.onnx", "unknown"),
        ("fold:resnet50", "unknown"),
        ("", "unknown"),
    ],
)
def test_an_old_sidecar_gets_its_weights_from_its_source(source, weights) -> None:
    meta = ModelMeta(
        name="m", task="classify", onnx_file="model.onnx", input_name="x",
        input_shape=[None, 3, 8, 8], input_dtype="float32", output_names=["logits"],
        preprocess=PreprocessSpec(height=8, width=8), source=source,
    )  # fmt: skip
    d = meta.to_dict()
    del d["weights"]  # written before the field existed
    assert weights_of_source(source) == weights
    assert ModelMeta.from_dict(d).weights == weights
    d["weights"] = "real"  # a recorded value wins
    assert ModelMeta.from_dict(d).weights == "real"


def test_weights_line_says_random_loudly() -> None:
    assert "RANDOM weights" in weights_line("resnet50", "random")
    assert "--from-dir" in weights_line("resnet50", "random")
    assert weights_line("mine", "real") == "mine has real (trained) weights"
    assert "unknown" in weights_line("mine", "unknown")
