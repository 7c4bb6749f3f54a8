"""The import hook that lets a torchvision built for another torch import beside torch+cpu,
on a stand-in package that fails exactly as PyPI's CUDA torchvision does here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

# What torchvision/_meta_registrations.py does at import: a fake kernel for an operator
# that only its compiled ops library (absent or unloadable here) would define.
FAKE = """import torch
@torch.library.register_fake("torchvision::nms")
def meta_nms(dets, scores, iou_threshold):
    return dets.new_empty(0, dtype=torch.long)
__version__ = "0.0+stand-in"
"""


def _run(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    pkg = tmp_path / "torchvision"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(FAKE)
    (pkg / "_C.so").write_bytes(b"not a library")  # an ops library that cannot load
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_without_the_hook_the_import_fails_as_pypis_torchvision_does(tmp_path) -> None:
    r = _run(tmp_path, "import torchvision")
    assert r.returncode != 0 and "operator torchvision::nms does not exist" in r.stderr


def test_with_the_hook_it_imports_and_the_hook_leaves(tmp_path) -> None:
    code = (
        "import sys\n"
        "from cvserve.models import torchvision_compat as c\n"
        "c.install(); c.install()\n"
        "assert sum(isinstance(f, c._Hook) for f in sys.meta_path) == 1\n"
        "assert 'torch' not in sys.modules  # free until torchvision is imported\n"
        "import torchvision\n"
        "assert torchvision.__version__ == '0.0+stand-in'\n"
        "assert not any(isinstance(f, c._Hook) for f in sys.meta_path)\n"
    )
    r = _run(tmp_path, code)
    assert r.returncode == 0, r.stderr
