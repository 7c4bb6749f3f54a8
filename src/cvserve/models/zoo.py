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
    #: Re-draw weight matrices that HF initializes to a constant (zero box heads and
    #: attention weights of DETR-style detectors) as N(0, 0.02), so random boxes are not
    #: just the anchors. (Score ties in top-k query selection, which torch and ONNX Runtime
    #: break differently, are avoided by a larger ``initializer_range`` in the config.)
    break_ties: bool = False

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

# --- dense tasks: segmentation, detection (RT-DETR), depth ----------------------------
# nvidia/segformer-b0-finetuned-ade-512-512: direct resize 512x512, bilinear, ImageNet
# mean/std; logits come out at 1/4 of the input (B, 150, 128, 128).
_ENTRIES.append(
    ZooEntry(
        name="segformer-b0",
        task="segment",
        model_class="SegformerForSemanticSegmentation",
        config_class="SegformerConfig",
        config={
            "num_encoder_blocks": 4,
            "depths": [2, 2, 2, 2],
            "sr_ratios": [8, 4, 2, 1],
            "hidden_sizes": [32, 64, 160, 256],
            "patch_sizes": [7, 3, 3, 3],
            "strides": [4, 2, 2, 2],
            "num_attention_heads": [1, 2, 5, 8],
            "mlp_ratios": [4, 4, 4, 4],
            "decoder_hidden_size": 256,
            "num_labels": 150,
        },
        processor_class="SegformerImageProcessor",
        processor={
            "size": {"height": 512, "width": 512},
            "resample": _BILINEAR,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
            "do_reduce_labels": True,
        },
        description="SegFormer-B0 semantic segmentation (3.8M params), 512x512, 150 ADE20k "
        "classes, logits at 128x128, like nvidia/segformer-b0-finetuned-ade-512-512",
    )
)

_ENTRIES.append(
    ZooEntry(
        name="tiny-segformer",
        task="segment",
        model_class="SegformerForSemanticSegmentation",
        config_class="SegformerConfig",
        config={
            "num_encoder_blocks": 2,
            "depths": [1, 1],
            "sr_ratios": [2, 1],
            "hidden_sizes": [8, 16],
            "patch_sizes": [7, 3],
            "strides": [4, 2],
            "num_attention_heads": [1, 2],
            "mlp_ratios": [2, 2],
            "decoder_hidden_size": 16,
            "num_labels": 5,
        },
        processor_class="SegformerImageProcessor",
        processor={
            "size": {"height": 64, "width": 64},
            "resample": _BILINEAR,
            "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD),
        },
        description="a tiny SegFormer for tests: 64x64, 5 classes, logits at 16x16",
        tiny=True,
    )
)

# PekingU/rtdetr_r18vd: ResNet-18-style backbone (basic blocks), 3-layer decoder, 300
# queries, 80 COCO classes. RTDetrImageProcessor: direct resize 640x640, bilinear, rescale
# to [0, 1] only (do_normalize False).
_ENTRIES.append(
    ZooEntry(
        name="rtdetr-r18",
        task="detect",
        model_class="RTDetrForObjectDetection",
        config_class="RTDetrConfig",
        config={
            "backbone_config": {
                "model_type": "rt_detr_resnet",
                "layer_type": "basic",
                "embedding_size": 64,
                "depths": [2, 2, 2, 2],
                "hidden_sizes": [64, 128, 256, 512],
                "out_features": ["stage2", "stage3", "stage4"],
            },
            "use_pretrained_backbone": False,
            # HF's 0.01 leaves the random encoder output ~0, so every anchor gets the same
            # score and the top-k query choice is a tie; 0.2 spreads the scores.
            "initializer_range": 0.2,
            "encoder_in_channels": [128, 256, 512],
            "hidden_expansion": 0.5,
            "decoder_layers": 3,
            "num_queries": 300,
            "num_labels": 80,
        },
        processor_class="RTDetrImageProcessor",
        processor={
            "size": {"height": 640, "width": 640},
            "resample": _BILINEAR,
            "do_normalize": False,
            "do_pad": False,
        },
        description="RT-DETR with a ResNet-18 backbone (20M params), 640x640, 300 queries, "
        "80 classes, like PekingU/rtdetr_r18vd",
        outputs=("logits", "pred_boxes"),
        break_ties=True,
    )
)

_ENTRIES.append(
    ZooEntry(
        name="tiny-rtdetr",
        task="detect",
        model_class="RTDetrForObjectDetection",
        config_class="RTDetrConfig",
        config={
            "backbone_config": {
                "model_type": "rt_detr_resnet",
                "layer_type": "basic",
                "embedding_size": 8,
                "depths": [1, 1, 1, 1],
                "hidden_sizes": [8, 16, 32, 64],
                "out_features": ["stage2", "stage3", "stage4"],
            },
            "use_pretrained_backbone": False,
            "initializer_range": 0.2,
            "encoder_in_channels": [16, 32, 64],
            "encoder_hidden_dim": 32,
            "encoder_ffn_dim": 64,
            "encoder_attention_heads": 2,
            "hidden_expansion": 0.5,
            "d_model": 32,
            "decoder_in_channels": [32, 32, 32],
            "decoder_ffn_dim": 64,
            "decoder_attention_heads": 2,
            "decoder_n_points": 2,
            "decoder_layers": 1,
            "num_queries": 10,
            "num_denoising": 0,
            "num_labels": 5,
        },
        processor_class="RTDetrImageProcessor",
        processor={
            "size": {"height": 64, "width": 64},
            "resample": _BILINEAR,
            "do_normalize": False,
            "do_pad": False,
        },
        description="a tiny RT-DETR for tests: 64x64, 10 queries, 5 classes",
        tiny=True,
        outputs=("logits", "pred_boxes"),
        break_ties=True,
    )
)

# LiheYoung/depth-anything-small-hf: DINOv2-small backbone (384 wide, 12 layers, 6 heads,
# patch 14, features of layers 9-12), DPT-style neck [48, 96, 192, 384], fusion 64, head 32.
# Its processor resizes keeping the aspect ratio to a multiple of 14 (about 518 on the
# short side, so shapes vary); a fixed 518x518 direct resize lets requests share batches.
_DEPTH_PROCESSOR: dict[str, Any] = {
    "size": {"height": 518, "width": 518},
    "keep_aspect_ratio": False,
    "ensure_multiple_of": 14,
    "resample": _BICUBIC,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "do_pad": False,
}

_ENTRIES.append(
    ZooEntry(
        name="depth-anything-small",
        task="depth",
        model_class="DepthAnythingForDepthEstimation",
        config_class="DepthAnythingConfig",
        config={
            "backbone_config": {
                "model_type": "dinov2",
                "hidden_size": 384,
                "num_hidden_layers": 12,
                "num_attention_heads": 6,
                "patch_size": 14,
                "image_size": 518,
                "out_indices": [9, 10, 11, 12],
                "reshape_hidden_states": False,
            },
            "patch_size": 14,
            "reassemble_hidden_size": 384,
            "reassemble_factors": [4, 2, 1, 0.5],
            "neck_hidden_sizes": [48, 96, 192, 384],
            "fusion_hidden_size": 64,
            "head_hidden_size": 32,
            "depth_estimation_type": "relative",
        },
        processor_class="DPTImageProcessor",
        processor=_DEPTH_PROCESSOR,
        description="Depth Anything small (DINOv2-S backbone, 25M params), relative depth at "
        "518x518 (fixed square, the HF processor keeps aspect), like "
        "LiheYoung/depth-anything-small-hf",
        outputs=("predicted_depth",),
    )
)

_ENTRIES.append(
    ZooEntry(
        name="tiny-depth",
        task="depth",
        model_class="DepthAnythingForDepthEstimation",
        config_class="DepthAnythingConfig",
        config={
            "backbone_config": {
                "model_type": "dinov2",
                "hidden_size": 32,
                "num_hidden_layers": 4,
                "num_attention_heads": 2,
                "mlp_ratio": 2,
                "patch_size": 14,
                "image_size": 56,
                "out_indices": [1, 2, 3, 4],
                "reshape_hidden_states": False,
            },
            "patch_size": 14,
            "reassemble_hidden_size": 32,
            "reassemble_factors": [4, 2, 1, 0.5],
            "neck_hidden_sizes": [8, 16, 32, 32],
            "fusion_hidden_size": 16,
            "head_hidden_size": 8,
        },
        processor_class="DPTImageProcessor",
        processor={**_DEPTH_PROCESSOR, "size": {"height": 56, "width": 56}},
        description="a tiny Depth Anything for tests: 56x56 (4x4 patches of 14)",
        tiny=True,
        outputs=("predicted_depth",),
    )
)

# --- image embeddings ------------------------------------------------------------------
# openai/clip-vit-base-patch32's vision tower with its projection: shortest edge 224,
# center-crop 224, bicubic, CLIP's mean/std; the answer is the 512-d image embedding.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CLIP_PROCESSOR: dict[str, Any] = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "resample": _BICUBIC,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
}
# facebook/dinov2-small: BitImageProcessor, shortest edge 256, center-crop 224, bicubic,
# ImageNet mean/std; the answer is the CLS token after the last layer norm (384-d).
_DINOV2_PROCESSOR: dict[str, Any] = {
    "size": {"shortest_edge": 256},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "resample": _BICUBIC,
    "image_mean": list(IMAGENET_MEAN),
    "image_std": list(IMAGENET_STD),
    "do_convert_rgb": True,
}
_ENTRIES += [
    ZooEntry(
        name="clip-vit-b32",
        task="embed",
        model_class="CLIPVisionModelWithProjection",
        config_class="CLIPVisionConfig",
        config={"projection_dim": 512},
        processor_class="CLIPImageProcessor",
        processor=_CLIP_PROCESSOR,
        description="CLIP ViT-B/32 image encoder with projection (88M params), 224x224, "
        "512-d embedding, like openai/clip-vit-base-patch32",
        outputs=("image_embeds",),
    ),
    ZooEntry(
        name="tiny-clip",
        task="embed",
        model_class="CLIPVisionModelWithProjection",
        config_class="CLIPVisionConfig",
        config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 16,
        },
        processor_class="CLIPImageProcessor",
        processor={
            **_CLIP_PROCESSOR,
            "size": {"shortest_edge": 32},
            "crop_size": {"height": 32, "width": 32},
        },  # fmt: skip
        description="a tiny CLIP image encoder for tests: 32x32, 16-d embedding",
        tiny=True,
        outputs=("image_embeds",),
    ),
    ZooEntry(
        name="dinov2-small",
        task="embed",
        model_class="Dinov2Model",
        config_class="Dinov2Config",
        config={
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "image_size": 518,
            "patch_size": 14,
        },  # fmt: skip
        processor_class="BitImageProcessor",
        processor=_DINOV2_PROCESSOR,
        description="DINOv2-S/14 (22M params), 224x224, 384-d CLS embedding, "
        "like facebook/dinov2-small",
        outputs=("pooler_output",),
    ),
    ZooEntry(
        name="tiny-dinov2",
        task="embed",
        model_class="Dinov2Model",
        config_class="Dinov2Config",
        config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "image_size": 28,
            "patch_size": 14,
        },  # fmt: skip
        processor_class="BitImageProcessor",
        processor={
            **_DINOV2_PROCESSOR,
            "size": {"shortest_edge": 32},
            "crop_size": {"height": 28, "width": 28},
        },  # fmt: skip
        description="a tiny DINOv2 for tests: 28x28 (2x2 patches of 14), 32-d CLS embedding",
        tiny=True,
        outputs=("pooler_output",),
    ),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def zoo_names() -> list[str]:
    """Names of every zoo model, sorted."""
    return sorted(ZOO)
