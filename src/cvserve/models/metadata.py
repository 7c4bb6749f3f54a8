"""ModelMeta: the sidecar that travels with every ONNX file in the model store."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec

SIDECAR_SUFFIX = ".json"
SCHEMA_VERSION = 1


@dataclass
class ModelMeta:
    """Everything the server needs to know about a model besides its graph."""

    name: str
    task: str  # "classify" (later: "segment", "detect", "depth", "ocr-det", "ocr-rec")
    onnx_file: str  # file name, relative to the sidecar's folder
    input_name: str
    input_shape: list[int | None]  # with the batch axis first, None where dynamic
    input_dtype: str  # "float32" | "uint8"
    output_names: list[str]
    preprocess: PreprocessSpec
    labels: list[str] = field(default_factory=list)
    params: int | None = None
    source: str = ""  # "zoo:resnet50", "hf-dir:/path", "user:/path/to.onnx"
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
        d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
        return cls(**d)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> ModelMeta:
        return cls.from_dict(json.loads(Path(path).read_text()))
