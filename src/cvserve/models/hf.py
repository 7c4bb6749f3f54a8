"""HuggingFace models for the build: which task a folder (or hub id) is, its preprocessing.

A ``save_pretrained`` folder (or a hub id, through ``from_pretrained`` and the HF cache)
names its architecture in ``config.json`` (``architectures``). That picks the task and the
outputs the ONNX graph gets:

* ``classify``: any ``...ForImageClassification`` transformers ships (``logits``);
* ``segment``: ``...ForSemanticSegmentation`` (``logits``, C x h x w);
* ``detect``: ``...ForObjectDetection`` (DETR-style ``logits`` and ``pred_boxes``);
* ``depth``: ``...ForDepthEstimation`` (``predicted_depth``);
* ``embed``: an image encoder whose output is one vector per image, see ``EMBEDDERS``
  (CLIP's vision tower with its projection, DINOv2's CLS token after the last norm).

Anything else (a text model, an instance-segmentation head, a config without
``architectures``) is refused with one line: building it as another task would serve a
wrong answer. Only the build child imports this module, and torch / transformers only
come in through the ``transformers`` module its callers pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cvserve.images.spec import PreprocessSpec

# PIL.Image.Resampling values -> PreprocessSpec.interpolation
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PLACEHOLDER_LABEL = re.compile(r"LABEL_\d+")

#: task -> (transformers' auto-mapping of that task, the outputs exported)
TASK_MAPPINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "classify": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", ("logits",)),
    "segment": ("MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", ("logits",)),
    "detect": ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", ("logits", "pred_boxes")),
    "depth": ("MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", ("predicted_depth",)),
}

#: image encoders served as ``embed``: architecture -> the output that is the vector
EMBEDDERS: dict[str, str] = {
    "CLIPVisionModelWithProjection": "image_embeds",
    "CLIPVisionModel": "pooler_output",
    "Dinov2Model": "pooler_output",
    "Dinov2WithRegistersModel": "pooler_output",
    "SiglipVisionModel": "pooler_output",
}


class UnsupportedModel(ValueError):
    """A model folder cvserve cannot serve (the message says why, in one line)."""


@dataclass(frozen=True)
class HFTask:
    """What a config is: the task, the transformers class to load and the outputs."""

    task: str
    architecture: str
    outputs: tuple[str, ...]


def task_of(config: Any, where: str = "the model") -> HFTask:
    """The task of a transformers config, from its ``architectures``; UnsupportedModel
    (one line naming the architecture) for one cvserve does not serve."""
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise UnsupportedModel(
            f"{where}: config.json names no architecture (its 'architectures' list is "
            "empty), so its task is unknown; save it with the task's model class"
        )
    arch = archs[0]
    if arch in EMBEDDERS:
        return HFTask("embed", arch, (EMBEDDERS[arch],))
    from transformers.models.auto import modeling_auto

    for task, (mapping, outputs) in TASK_MAPPINGS.items():
        if arch in getattr(modeling_auto, mapping, {}).values():
            return HFTask(task, arch, outputs)
    served = "image classification, semantic segmentation, object detection, depth "
    served += f"estimation, or an image encoder ({', '.join(sorted(EMBEDDERS))})"
    raise UnsupportedModel(f"{where}: architecture {arch} is not one cvserve serves: {served}")


def load_model(transformers: Any, source: str, hf_task: HFTask, **kwargs: Any) -> Any:
    """The transformers model class of ``hf_task`` from ``source`` (folder or hub id)."""
    cls = getattr(transformers, hf_task.architecture, None)
    if cls is None:
        raise UnsupportedModel(f"transformers has no class {hf_task.architecture}")
    return cls.from_pretrained(source, trust_remote_code=False, **kwargs)


def labels_for(task: str, config: Any) -> list[str]:
    """Class names for tasks that have classes; [] for depth and embeddings."""
    return labels_from_config(config) if task in ("classify", "segment", "detect") else []


def labels_from_config(config: Any) -> list[str]:
    """Class names from ``config.id2label``; HF's ``LABEL_i`` placeholders become ``class_i``."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", 0) or len(id2label))
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    if all(_PLACEHOLDER_LABEL.fullmatch(x) for x in names):
        return [f"class_{i}" for i in range(n)]
    return names


def split_hub_id(ref: str) -> tuple[str, str | None]:
    """``org/name@revision`` -> (``org/name``, ``revision`` or None)."""
    repo, _, rev = ref.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", repo):
        raise UnsupportedModel(f"{ref!r} is not a hub id (org/name or org/name@revision)")
    return repo, rev or None


def processor_class(transformers: Any, name: str) -> Any:
    # transformers 5 names the PIL/numpy backend "<Name>Pil" (the plain name wants
    # torchvision); in transformers 4 the plain name is the slow PIL/numpy processor.
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None)
    if cls is None:
        raise UnsupportedModel(f"transformers has no image processor {name!r}")
    return cls


def load_image_processor(transformers: Any, source: str, **kwargs: Any) -> Any:
    """The PIL/numpy image processor saved with the model (never one with remote code)."""
    major = int(transformers.__version__.split(".")[0])
    backend = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return transformers.AutoImageProcessor.from_pretrained(
        source, trust_remote_code=False, **backend, **kwargs
    )


# --- preprocessing --------------------------------------------------------------------
def _interpolation(resample: Any) -> str:
    if resample is None:
        return "bilinear"
    try:
        return _PIL_RESAMPLE[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported resample {resample!r}") from None


def _triple(v: Any, default: float) -> tuple[float, float, float]:
    if v is None:
        return (default,) * 3
    if isinstance(v, int | float):
        return (float(v),) * 3
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _processor_kind(processor: Any, d: dict[str, Any]) -> str:
    kind = d.get("image_processor_type") or type(processor).__name__
    return re.sub(r"(Pil|Fast)$", "", kind)


def preprocess_spec_from_hf(processor: Any) -> PreprocessSpec:
    """Translate a HuggingFace image processor's settings into a PreprocessSpec.

    ConvNextImageProcessor (used by the ResNet checkpoints): below 384 the shortest edge is
    resized to ``int(shortest_edge / crop_pct)`` then center-cropped to a square of
    ``shortest_edge``; at 384 and above the image is warped to a square. Other processors
    (ViT, MobileNetV2, CLIP, BiT for DINOv2, ...): ``size`` height/width is a direct
    resize, ``size`` shortest_edge plus ``crop_size`` is resize-then-center-crop.
    """
    d = processor.to_dict()
    kind = _processor_kind(processor, d)
    size = d.get("size") or {}
    if d.get("do_resize") is False:
        raise ValueError(f"{kind} does not resize, so its input size is not fixed")
    crop = d.get("crop_size") if d.get("do_center_crop") else None

    if kind == "ConvNextImageProcessor":
        if crop:
            raise ValueError("ConvNextImageProcessor with do_center_crop is not supported")
        se = size.get("shortest_edge")
        if not se:
            raise ValueError(f"ConvNextImageProcessor needs size.shortest_edge, got {size}")
        crop_pct = d.get("crop_pct") or 224 / 256
        if se < 384:
            geometry = dict(
                height=se,
                width=se,
                resize_mode="shortest_edge_crop",
                resize_shortest=int(se / crop_pct),
            )
        else:
            geometry = dict(height=se, width=se, resize_mode="direct")
    elif "height" in size and "width" in size:
        h, w = int(size["height"]), int(size["width"])
        if d.get("keep_aspect_ratio"):
            # DPT / Depth Anything: the output shape follows each image's aspect ratio.
            raise ValueError(
                f"{kind} with keep_aspect_ratio has no fixed input size; "
                "set keep_aspect_ratio=False for a fixed square"
            )
        if d.get("do_pad") and d.get("size_divisor"):
            raise ValueError(f"{kind} with do_pad and size_divisor has no fixed input size")
        multiple = int(d.get("ensure_multiple_of") or 1)
        if multiple > 1:  # DPT rounds each side to the nearest multiple
            h = max(multiple, round(h / multiple) * multiple)
            w = max(multiple, round(w / multiple) * multiple)
        if crop and (crop.get("height"), crop.get("width")) != (h, w):
            raise ValueError(f"{kind}: resize to {h}x{w} then crop to {crop} is not supported")
        geometry = dict(height=h, width=w, resize_mode="direct")
    elif size.get("shortest_edge") and not size.get("longest_edge"):
        if not crop:
            raise ValueError(
                f"{kind}: shortest-edge resize without a center crop has no fixed size"
            )
        geometry = dict(
            height=int(crop["height"]),
            width=int(crop["width"]),
            resize_mode="shortest_edge_crop",
            resize_shortest=int(size["shortest_edge"]),
        )
    else:
        raise ValueError(f"{kind}: unsupported size {size}")

    normalize = d.get("do_normalize", True)
    return PreprocessSpec(
        **geometry,
        interpolation=_interpolation(d.get("resample")),
        rescale=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
        mean=_triple(d.get("image_mean"), 0.5) if normalize else (0.0, 0.0, 0.0),
        std=_triple(d.get("image_std"), 0.5) if normalize else (1.0, 1.0, 1.0),
        extra={"hf_processor": kind},
    )


def hub_cache_hint() -> str:
    """Where from_pretrained looks for cached files (for error messages)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        return "the HuggingFace cache"
