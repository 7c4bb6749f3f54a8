"""Fixtures for the model zoo and store tests: a private store, a built tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store; CVSERVE_CACHE points at it so nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CVSERVE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with tiny-resnet built once, through the real child process."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from cvserve.models import store

    root = tmp_path_factory.mktemp("built-cache")
    lines: list[str] = []
    store.ensure_built("tiny-resnet", root, progress=lines.append)
    assert lines[0] == "building tiny-resnet: creating model"
    assert any("exporting ONNX" in x for x in lines)
    assert lines[-1].startswith("building tiny-resnet: done in ")
    return root
