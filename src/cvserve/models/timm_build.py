"""timm classifiers for the build: a timm model name (random weights) or a local timm
checkpoint folder (``config.json`` with ``architecture``, plus ``model.safetensors`` or
``pytorch_model.bin``, as timm's ``save_for_hf`` / ``push_to_hf_hub`` write it).

The preprocessing comes from timm's own data config
(``timm.data.resolve_model_data_config``): ``input_size``, ``crop_pct``, ``crop_mode``,
``interpolation``, ``mean``/``std``. timm's eval transform is ``Resize(floor(size /
crop_pct))`` of the shorter side (the longer side truncated), ``CenterCrop(size)``,
``ToTensor``, ``Normalize``: the same geometry as a PreprocessSpec
``shortest_edge_crop``, with torchvision's crop offsets (``extra["crop_offset"] =
"round"``: ``int(round((size - crop) / 2))``, where HuggingFace floors).

The model is wrapped so the build's exporter sees what it sees for a transformers model
(``pixel_values`` in, an object with ``logits`` out, a ``config`` with ``id2label``).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cvserve.images.spec import PreprocessSpec
from cvserve.models import torchvision_compat

TIMM_EXTRA_HINT = "timm models need timm (in the zoo extra): pip install 'cvserve[zoo]'"


class TimmError(ValueError):
    """A timm model or folder that cannot be built (one line)."""


def import_timm() -> Any:
    torchvision_compat.install()
    try:
        import timm
        import timm.data
    except ImportError as e:
        raise TimmError(f"{TIMM_EXTRA_HINT} ({e})") from e
    return timm


def create(source: str) -> tuple[Any, str, str]:
    """(timm model in eval mode, source tag, weights) of a model name or checkpoint folder."""
    timm = import_timm()
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise TimmError(f"{folder} has no config.json (expected a timm checkpoint folder)")
        try:
            model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise TimmError(f"{folder}: timm cannot load it: {e}") from e
        return model.eval(), f"timm-dir:{folder.resolve()}", "real"
    if not timm.is_model(source):
        raise TimmError(
            f"{source!r} is neither a folder nor a timm model name (timm.list_models() lists them)"
        )
    model = timm.create_model(source, pretrained=False)
    return model.eval(), f"timm-name:{source}", "random"


def data_config(model: Any) -> dict[str, Any]:
    """timm's own eval data config of ``model``."""
    timm = import_timm()
    return dict(timm.data.resolve_model_data_config(model))


def spec_from_timm(cfg: dict[str, Any]) -> PreprocessSpec:
    """timm's eval data config as a PreprocessSpec (see the module docstring)."""
    _, h, w = cfg["input_size"]
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    mode = cfg.get("crop_mode") or "center"
    interp = str(cfg.get("interpolation") or "bilinear")
    if interp not in ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"):
        raise TimmError(f"timm interpolation {interp!r} has no PreprocessSpec equivalent")
    if mode == "squash":  # resize both sides to size / crop_pct, then crop
        if crop_pct != 1.0:
            raise TimmError("timm crop_mode 'squash' with crop_pct < 1 is not supported")
        geometry: dict[str, Any] = dict(height=h, width=w, resize_mode="direct")
    elif mode == "center":
        if h != w:
            raise TimmError(f"timm input {h}x{w}: only square center crops are supported")
        geometry = dict(
            height=h,
            width=w,
            resize_mode="shortest_edge_crop",
            resize_shortest=math.floor(h / crop_pct),
        )
    else:
        raise TimmError(f"timm crop_mode {mode!r} is not supported")
    return PreprocessSpec(
        **geometry,
        interpolation=interp,  # type: ignore[arg-type]
        mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(cfg["std"]),  # type: ignore[arg-type]
        extra={
            "crop_offset": "round",
            "timm_data_config": {k: _plain(v) for k, v in cfg.items()},
        },
    )


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def labels_of(model: Any) -> list[str]:
    n = int(getattr(model, "num_classes", 0) or 0)
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or [])
    if len(names) == n:
        return [str(x) for x in names]
    return [f"class_{i}" for i in range(n)]


def as_hf_like(torch: Any, model: Any, name: str) -> Any:
    """``model`` behind the interface the exporter uses for transformers models."""
    labels = labels_of(model)

    class TimmClassifier(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.config = SimpleNamespace(
                id2label=dict(enumerate(labels)),
                num_labels=len(labels),
                model_type=f"timm:{name}",
            )

        def forward(self, pixel_values: Any, return_dict: bool = True) -> Any:
            return SimpleNamespace(logits=self.inner(pixel_values))

    if not getattr(model, "num_classes", 0):
        raise TimmError(f"timm model {name!r} has no classifier (num_classes=0)")
    return TimmClassifier(model).eval()
