"""The model zoo: which architectures ``cvserve`` can build locally, as plain data.

Each entry names a HuggingFace model class, the keyword arguments of its config (random
weights: timing is what matters here) and the image processor whose settings define the
model's preprocessing. Nothing here imports torch or transformers; ``cvserve.models.build``
turns an entry into an ONNX file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD

# PIL's Resampling enum values, as HuggingFace processor configs store them.
_BILINEAR = 2
_BICUBIC = 3


@dataclass(frozen=True)
class ZooEntry:
    """One buildable model: architecture config plus the image processor that feeds it."""

    name: str
    task: str
    model_class: str  # a transformers class name, e.g. "ResNetForImageClassification"
    config_class: str  # e.g. "ResNetConfig"
    config: dict[str, Any] = field(default_factory=dict)
    processor_class: str = "ConvNextImageProcessor"
    processor: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    tiny: bool = False  # for tests: builds in about a second
    #: Model outputs exported to ONNX, by attribute of the HF output object, in order.
    outputs: tuple[str, ...] = ("logits",)

    @property
    def source(self) -> str:
        return f"zoo:{self.name}"


# The HF ResNet checkpoints (microsoft/resnet-*) preprocess with ConvNextImageProcessor:
# shortest edge 224 / crop_pct 0.875 -> resize to 256, center-crop 224, bicubic.
_RESNET_PROCESSOR: dict[str, Any] = {
    "size": {"shortest_edge": 224},
    "crop_pct": 0.875,
    "resample": _BICUBIC,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
}

_ENTRIES = [
    ZooEntry(
        name="resnet50",
        task="classify",
        model_class="ResNetForImageClassification",
        config_class="ResNetConfig",
        config={"num_labels": 1000},
        processor_class="ConvNextImageProcessor",
        processor=_RESNET_PROCESSOR,
        description="ResNet-50 (bottleneck, 25.6M params), 224x224, like microsoft/resnet-50",
    ),
    ZooEntry(
        name="resnet18",
        task="classify",
        model_class="ResNetForImageClassification",
        config_class="ResNetConfig",
        config={
            "layer_type": "basic",
            "depths": [2, 2, 2, 2],
            "hidden_sizes": [64, 128, 256, 512],
            "embedding_size": 64,
            "num_labels": 1000,
        },
        processor_class="ConvNextImageProcessor",
        processor=_RESNET_PROCESSOR,
        description="ResNet-18 (basic blocks, 11.7M params), 224x224, like microsoft/resnet-18",
    ),
    ZooEntry(
        name="mobilenet-v2",
        task="classify",
        model_class="MobileNetV2ForImageClassification",
        config_class="MobileNetV2Config",
        config={"num_labels": 1000},
        # google/mobilenet_v2_1.0_224: shortest edge 256, center-crop 224, bilinear, mean/std 0.5
        processor_class="MobileNetV2ImageProcessor",
        processor={
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "resample": _BILINEAR,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        description="MobileNetV2 1.0 (3.5M params), 224x224, like google/mobilenet_v2_1.0_224",
    ),
    ZooEntry(
        name="vit-base",
        task="classify",
        model_class="ViTForImageClassification",
        config_class="ViTConfig",
        config={"num_labels": 1000},
        # google/vit-base-patch16-224: direct resize to 224x224, bilinear, mean/std 0.5
        processor_class="ViTImageProcessor",
        processor={
            "size": {"height": 224, "width": 224},
            "resample": _BILINEAR,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        description="ViT-Base/16 (86M params), 224x224, like google/vit-base-patch16-224",
    ),
    ZooEntry(
        name="tiny-resnet",
        task="classify",
        model_class="ResNetForImageClassification",
        config_class="ResNetConfig",
        config={
            "layer_type": "basic",
            "embedding_size": 8,
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "num_labels": 10,
        },
        # shortest edge 32 / 0.875 -> resize to 36, center-crop 32
        processor_class="ConvNextImageProcessor",
        processor={**_RESNET_PROCESSOR, "size": {"shortest_edge": 32}},
        description="a tiny ResNet for tests: 32x32 input, 10 classes",
        tiny=True,
    ),
    ZooEntry(
        name="tiny-vit",
        task="classify",
        model_class="ViTForImageClassification",
        config_class="ViTConfig",
        config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_labels": 10,
        },
        processor_class="ViTImageProcessor",
        processor={
            "size": {"height": 32, "width": 32},
            "resample": _BILINEAR,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        },
        description="a tiny ViT for tests: 32x32 input (direct resize), 10 classes",
        tiny=True,
    ),
]

_ENTRIES.append(
    ZooEntry(
        name="yolos-tiny",
        task="detect",
        model_class="YolosForObjectDetection",
        config_class="YolosConfig",
        config={
            "hidden_size": 192,
            "num_hidden_layers": 12,
            "num_attention_heads": 3,
            "intermediate_size": 768,
            "image_size": [512, 512],
            "num_detection_tokens": 100,
            "num_labels": 91,
        },
        # hustvl/yolos-tiny's processor resizes to a shortest edge of 800 (any shape);
        # a fixed 512x512 direct resize lets requests share batches.
        processor_class="ViTImageProcessor",
        processor={
            "size": {"height": 512, "width": 512},
            "resample": _BILINEAR,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        },
        description="YOLOS-tiny detector (6.5M params), 512x512, 100 queries; "
        "stage A of the detect-classify pipeline",
        outputs=("logits", "pred_boxes"),
    )
)

_ENTRIES.append(
    ZooEntry(
        name="tiny-yolos",
        task="detect",
        model_class="YolosForObjectDetection",
        config_class="YolosConfig",
        config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": [64, 64],
            "num_detection_tokens": 10,
            "num_labels": 5,
        },
        processor_class="ViTImageProcessor",
        processor={
            "size": {"height": 64, "width": 64},
            "resample": _BILINEAR,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        },
        description="a tiny YOLOS detector for tests: 64x64, 10 queries, 5 classes",
        tiny=True,
        outputs=("logits", "pred_boxes"),
    )
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def zoo_names() -> list[str]:
    """Names of every zoo model, sorted."""
    return sorted(ZOO)
