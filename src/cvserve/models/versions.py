"""Versions of a model in the store: version 1 is the model's own folder (every model
stored before versions existed), version N > 1 the sub-folder ``<name>/<N>/`` with its own
ONNX file and sidecar (:func:`cvserve.models.store.version_dir`). What a server serves of
them is its ``version_policy`` (:func:`cvserve.config.select_versions`)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cvserve.models.metadata import ModelMeta
from cvserve.models.store import (
    ModelBuildError,
    ModelNotFound,
    _models_root,
    _read_built_in,
    _run_build_child,
    _store_lock,
    cache_dir,
    ensure_built,
    model_dir,
    version_dir,
)
from cvserve.models.zoo import ZOO
from cvserve.trace import Say

__all__ = ["build_version", "model_versions", "version_file"]


def model_versions(name: str, cache: Path | str | None = None) -> dict[int, ModelMeta]:
    """Every built version of model ``name`` in the store, by number ({} when none)."""
    try:
        folder = model_dir(name, cache)
    except ValueError:
        return {}
    found: dict[int, ModelMeta] = {}
    meta = _read_built_in(folder)
    if meta is not None:
        found[1] = meta
    if folder.is_dir():
        for sub in folder.iterdir():
            if sub.name.isdigit() and int(sub.name) > 1 and sub.is_dir():
                meta = _read_built_in(sub)
                if meta is not None:
                    found[int(sub.name)] = meta
    return dict(sorted(found.items()))


def version_file(name: str, version: int, cache: Path | str | None = None) -> Path:
    """The ONNX file of a built version (ModelNotFound when it is not in the store)."""
    meta = model_versions(name, cache).get(version)
    if meta is None:
        raise ModelNotFound(f"{name} version {version}", [])
    return version_dir(name, version, cache) / meta.onnx_file


def build_version(
    name: str,
    version: int,
    cache: Path | str | None = None,
    progress: Say | None = None,
    *,
    timeout: float | None = None,
) -> ModelMeta:
    """Build zoo model ``name`` (fresh random weights, as every zoo build) as version
    ``version`` of it: built in a folder of its own, then moved into the store."""
    if name not in ZOO:
        raise ModelNotFound(name, sorted(ZOO))
    if version == 1:
        return ensure_built(name, cache, progress, force=True, timeout=timeout)
    root = cache_dir(cache)
    target = version_dir(name, version, root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=_models_root(root).parent) as tmp:
        _run_build_child([name, "--cache-dir", tmp], name, progress, timeout)
        built = model_dir(name, tmp)
        with _store_lock(root):
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built), str(target))
    meta = _read_built_in(target)
    if meta is None:
        raise ModelBuildError(name, 0, "error: the build finished but left no model behind")
    return meta
