"""docs/pipelines.md stays true: every ```yaml block loads with ``load_config`` and its
pipelines' graphs are well formed (tests/test_docs.py parses its ```bash blocks' commands,
as every page's)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cvserve.config import load_config
from cvserve.config.graph import build_graph

PAGE = Path(__file__).resolve().parents[1] / "docs" / "pipelines.md"
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
BLOCKS = [(m.group(1), m.group(2)) for m in FENCE.finditer(PAGE.read_text())]
YAML = [b for lang, b in BLOCKS if lang == "yaml"]
BASH = [b for lang, b in BLOCKS if lang == "bash"]


def test_the_page_has_examples():
    assert len(YAML) >= 5 and len(BASH) >= 3


@pytest.mark.parametrize("text", YAML, ids=[f"yaml{i}" for i in range(len(YAML))])
def test_every_yaml_block_loads(text, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)

    def task(step) -> str:  # what the page's models are (a store would say)
        if step.target == "yolos-tiny":
            return "detect"
        return "embed" if "embed" in step.target else "classify"

    for p in cfg.pipelines:
        if p.kind == "detect-embed":
            assert p.graph_steps[2].target == p.params["embedder"]
        build_graph(p.graph_steps, task)


def test_the_runnable_block_runs():
    import sys

    r = subprocess.run([sys.executable, "-m", "cvserve", "worker", "--help"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "--config FILE" in r.stdout
