"""Model zoo and store: build HF models to ONNX, register user ONNX files, read sidecars.

Importing this package never imports torch; ``cvserve.models.build`` (the zoo extra) does.
"""

from cvserve.models.metadata import ModelMeta
from cvserve.models.store import (
    InvalidModel,
    ModelBuildError,
    ModelEntry,
    ModelNotBuilt,
    ModelNotFound,
    add_model,
    build_from_dir,
    cache_dir,
    describe,
    ensure_built,
    fold_normalize,
    list_models,
    load_meta,
    model_path,
)
from cvserve.models.zoo import ZOO, ZooEntry

__all__ = [
    "ZOO",
    "InvalidModel",
    "ModelBuildError",
    "ModelEntry",
    "ModelMeta",
    "ModelNotBuilt",
    "ModelNotFound",
    "ZooEntry",
    "add_model",
    "build_from_dir",
    "cache_dir",
    "describe",
    "ensure_built",
    "fold_normalize",
    "list_models",
    "load_meta",
    "model_path",
]
