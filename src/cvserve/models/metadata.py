"""ModelMeta: the sidecar that travels with every ONNX file in the model store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec

SIDECAR_SUFFIX = ".json"
WEIGHTS = ("real", "random", "unknown")
SCHEMA_VERSION = 1


@dataclass
class ModelMeta:
    """Everything the server needs to know about a model besides its graph."""

    name: str
    task: str  # "classify", "segment", "detect", "depth", "embed", "ocr-det", "ocr-rec"
    onnx_file: str  # file name, relative to the sidecar's folder
    input_name: str
    input_shape: list[int | None]  # with the batch axis first, None where dynamic
    input_dtype: str  # "float32" | "uint8"
    output_names: list[str]
    preprocess: PreprocessSpec
    labels: list[str] = field(default_factory=list)
    params: int | None = None
    source: str = ""  # "zoo:resnet50", "hf-dir:/path", "user:/path/to.onnx"
    #: "real" (trained weights: a folder, hub id or timm checkpoint), "random" (built from
    #: an architecture config: fine for timing, its answers mean nothing) or "unknown"
    #: (a user's ONNX file)
    weights: str = "unknown"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["schema_version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        d = dict(d)
        d.pop("schema_version", None)
        d.setdefault("weights", weights_of_source(d.get("source", "")))
        d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> ModelMeta:
        return cls.from_dict(json.loads(Path(path).read_text()))


def weights_of_source(source: str) -> str:
    """What a sidecar written before ``weights`` was recorded holds, from its source."""
    kind = source.split(":", 1)[0]
    if kind in ("zoo", "timm-name"):
        return "random"
    if kind in ("hf-dir", "hf-hub", "timm-dir"):
        return "real"
    return "unknown"


def weights_line(name: str, weights: str) -> str:
    """One sentence saying what model ``name``'s weights are (the demo's first line)."""
    if weights == "random":
        return (
            f"{name} has RANDOM weights (built from an architecture config): its answers mean "
            "nothing, its timing is real; serve real weights with `cvserve models build "
            "--from-dir`, `--from-hub` or `cvserve models add` (docs/your-own-model.md)"
        )
    if weights == "real":
        return f"{name} has real (trained) weights"
    return f"{name}: weights of unknown origin (a user's ONNX file)"
