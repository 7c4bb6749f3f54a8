"""Make a torchvision built for another torch importable, for timm's Python code.

PyPI's torchvision wheels are built against the CUDA build of torch. Beside the CPU build
of the same torch version (``torch==2.13.0+cpu``, what the zoo extra installs here), its
C++ ops library cannot load; torchvision then still imports its pure-Python parts
(transforms, model definitions), except that ``torchvision/_meta_registrations.py``
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``, and those
registrations fail ("operator torchvision::nms does not exist"), so ``import torchvision``
fails, and with it every ``import timm`` and transformers' image utilities.

:func:`install` adds an import hook: on the first ``import torchvision`` it tries to load
torchvision's ops library and, only when that fails, declares the two operators' schemas
(no kernels: calling ``torchvision.ops.nms`` still raises torchvision's own "Couldn't
load custom C++ ops"). cvserve never needs torchvision's compiled ops: timm's models and
transforms are plain torch and PIL. Nothing is imported until torchvision is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: Any = None  # the torch.library.Library holding the schemas (kept alive)


def declare_missing_ops() -> bool:
    """Declare ``torchvision::nms`` / ``qnms`` when torchvision's ops library cannot load
    beside this torch; True when it did. Call before ``import torchvision``."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import glob
    import os

    import torch

    if hasattr(torch.ops, "torchvision") and _has_op(torch, "nms"):
        return False
    folder = list(spec.submodule_search_locations)[0]
    for lib in glob.glob(os.path.join(folder, "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return False  # the real ops: nothing to do
        except (OSError, RuntimeError):
            pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _LIBRARY.define(schema)
    return True


def _has_op(torch: Any, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


class _Hook(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_missing_ops` just before torchvision is first imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname == "torchvision":
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Hook)]
            declare_missing_ops()
        return None  # the normal finders import it


def install() -> None:
    """Add the import hook (idempotent; free until something imports torchvision)."""
    if "torchvision" in sys.modules or any(isinstance(f, _Hook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Hook())
