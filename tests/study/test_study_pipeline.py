"""``cvserve study --pipeline FILE``: the broker experiment also measures the file's own
pipelines, over each broker, served as declared."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cvserve.cli import build_parser
from cvserve.config import ConfigError, server_config_from_dict
from cvserve.study.context import StudyConfig, StudyContext
from cvserve.study.experiments.broker import _broker_config, _broker_plans
from cvserve.study.plan import settings_for

MINE = """
pipelines:
  - name: people
    steps:
      - {name: detect, model: tiny-yolos, params: {top_k: 4}}
      - {name: crops, crop: detect, margin: 0.1}
      - {name: cls, model: tiny-resnet, input: crops, via: broker}
"""


def _ctx(tmp_path: Path, text: str) -> StudyContext:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    ctx = StudyContext(
        config=StudyConfig(out=tmp_path / "out", profile="quick", pipelines=path),
        settings=settings_for("quick"), images_root=tmp_path, progress=lambda e: None,
    )  # fmt: skip
    ctx.has_ocr = lambda: False  # type: ignore[method-assign]
    ctx.redis_unavailable = lambda: None  # type: ignore[method-assign]
    return ctx


def test_the_files_pipelines_are_points_of_the_broker_experiment(tmp_path):
    ctx = _ctx(tmp_path, MINE)
    plans = _broker_plans(ctx, None)
    mine = [p for p in plans if p.target == "people"]
    assert [p.labels["broker"] for p in mine] == ["inprocess", "redis"]
    for broker in ("inprocess", "redis"):
        served = yaml.safe_load(
            _broker_config(ctx, broker).replace("{redis}", "redis://127.0.0.1:6379")
        )
        cfg = server_config_from_dict(served)  # what the study's server will load
        people = next(p for p in cfg.pipelines if p.name == "people")
        assert [s.name for s in people.graph_steps] == ["detect", "crops", "cls"]
        assert people.graph_steps[2].via == "broker"


def test_a_bad_file_is_one_line(tmp_path):
    ctx = _ctx(tmp_path, "pipelines:\n  - {name: p, steps: [{name: a, crop: a, colour: 1}]}\n")
    with pytest.raises(ConfigError, match="step 'a': unknown keys"):
        _broker_plans(ctx, None)


def test_the_flag(tmp_path):
    args = build_parser().parse_args(["study", "--pipeline", "mine.yaml", "--only", "broker"])
    assert args.pipeline == "mine.yaml"
