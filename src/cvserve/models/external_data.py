"""ONNX files whose weights live beside them (ONNX external data): check and bring them in.

A model saved with ``onnx.save(..., save_as_external_data=True)`` names, per tensor, a
file relative to its own folder. ``cvserve models add`` copies one file into the store,
so such a model is rewritten with its weights inside (or, past protobuf's 2 GB limit,
beside it as ``model.onnx.data``). Every named file must lie inside the model's folder: a
location that is absolute, climbs out with ``..`` or follows a link out is refused before
anything reads it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["DATA_FILE", "UnsafeExternalData", "external_files", "save_self_contained"]

#: The one file a stored model keeps its weights in when they cannot be inlined.
DATA_FILE = "model.onnx.data"
#: Inline below this many bytes of tensor data (protobuf refuses messages of 2 GiB).
_INLINE_LIMIT = 1_800_000_000


class UnsafeExternalData(ValueError):
    """An external-data location is missing or points outside the model's folder."""


def _tensors(model: Any) -> list[Any]:
    from onnx import external_data_helper

    return list(external_data_helper._get_all_tensors(model))


def external_files(model: Any, folder: Path) -> list[Path]:
    """The files ``model``'s tensors keep their data in, each checked to be a regular file
    inside ``folder``; an empty list for a self-contained model."""
    from onnx import TensorProto

    root = folder.resolve()
    found: dict[Path, None] = {}
    for t in _tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        what = f"tensor {t.name!r}: external data location {loc!r}"
        parts = PurePosixPath(loc.replace("\\", "/")).parts
        if not loc or os.path.isabs(loc) or PureWindowsPath(loc).anchor or ".." in parts:
            raise UnsafeExternalData(f"{what} must be a path inside the model's folder")
        path = (root / loc).resolve()
        if not path.is_relative_to(root):
            raise UnsafeExternalData(f"{what} leads out of the model's folder ({path})")
        if not path.is_file():
            raise UnsafeExternalData(f"{what}: no such file beside the model ({path})")
        found[path] = None
    return list(found)


def save_self_contained(src: Path, dst: Path) -> list[str]:
    """Write ``src`` (with its checked external data) to ``dst`` with the weights inside, or
    in ``DATA_FILE`` beside ``dst`` when they are too big; returns the files written."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    external_files(model, src.parent)
    onnx.load_external_data_for_model(model, str(src.parent))
    size = sum(len(t.raw_data) for t in _tensors(model))
    data = dst.parent / DATA_FILE
    data.unlink(missing_ok=True)
    if size < _INLINE_LIMIT:
        onnx.save(model, str(dst))
        return [dst.name]
    onnx.save(model, str(dst), save_as_external_data=True, location=DATA_FILE)
    return [dst.name, DATA_FILE]
