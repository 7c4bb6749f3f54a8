"""The README's examples stay true: its config files load, its commands parse."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("block", re.findall(r"```yaml\n(.*?)```", README, re.S))
def test_yaml_examples_load(block, tmp_path):
    from cvserve.config import load_config

    path = tmp_path / "serve.yaml"
    path.write_text(block)
    cfg = load_config(path)
    assert cfg.models or cfg.pipelines


def _cvserve_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip().rstrip("&").strip()
            if line.startswith("cvserve "):
                cmds.append(line)
    return cmds


@pytest.mark.parametrize("cmd", _cvserve_commands())
def test_command_examples_parse(cmd):
    from cvserve.cli import build_parser

    build_parser().parse_args(shlex.split(cmd)[1:])
