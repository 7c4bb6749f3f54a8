"""PreprocessSpec: what a model wants its input pixels to look like."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ResizeMode = Literal["shortest_edge_crop", "direct", "letterbox"]
Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """Target geometry and pixel encoding of a model input.

    ``shortest_edge_crop``: scale so the shorter side is ``resize_shortest`` (keeping the
    aspect ratio, longer side truncated as HuggingFace does), then center-crop to
    ``height`` x ``width`` (offsets ``(size - crop) // 2`` as HuggingFace; with
    ``extra["crop_offset"] = "round"``, ``int(round((size - crop) / 2))`` as torchvision's
    CenterCrop, which timm uses). ``direct``: resize straight to ``height`` x ``width``.
    ``letterbox``: scale keeping the aspect ratio so the whole image fits in ``height`` x
    ``width`` (each side ``round(side * scale)``), placed at the top-left corner and padded
    on the bottom/right with ``extra["pad_value"]`` (an RGB triple or one int, default 0,
    in raw 0..255 pixel values, before normalization), as HuggingFace's ``do_pad`` does.
    Pixels are rescaled by ``rescale`` (1/255) then normalized ``(x - mean) / std``;
    with ``dtype='uint8'`` the raw pixels are sent and the model normalizes itself.
    """

    height: int
    width: int
    resize_mode: ResizeMode = "shortest_edge_crop"
    resize_shortest: int | None = None
    interpolation: Interpolation = "bilinear"
    rescale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "uint8"] = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError("height and width must be positive")
        if self.resize_mode == "shortest_edge_crop" and self.resize_shortest is None:
            object.__setattr__(self, "resize_shortest", max(self.height, self.width))
        if self.resize_mode not in ("shortest_edge_crop", "direct", "letterbox"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            raise ValueError("mean and std need 3 values each, std non-zero")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Per-image tensor shape (no batch axis)."""
        if self.layout == "NCHW":
            return (3, self.height, self.width)
        return (self.height, self.width, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> PreprocessSpec:
        d = self.to_dict()
        d.update(changes)
        return PreprocessSpec.from_dict(d)
