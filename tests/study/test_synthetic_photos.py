"""``cvserve study`` from any folder: without the shared photos it writes synthetic ones
(small, medium, large) and says so in one line, as the demo does."""

from __future__ import annotations

import pytest
from PIL import Image

from cvserve.bench.inputs import SYNTHETIC_SIZES
from cvserve.study import runner
from cvserve.study.context import StudyConfig, StudyError


def test_falls_back_to_synthetic_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project's root
    monkeypatch.setattr(runner, "default_images_root", lambda: None)
    seen = {}

    def fake_run(exp, ctx, per_point):  # noqa: ANN001, ANN202 - no servers in this test
        seen["root"] = ctx.images_root
        seen["medium"] = ctx.images("medium")
        seen["ocr"] = ctx.ocr_missing()
        return None

    monkeypatch.setattr(runner, "_run_experiment", fake_run)
    events = []
    runner.run_study(StudyConfig(out=tmp_path / "study", profile="quick", only=["models"]),
                     progress=events.append)  # fmt: skip
    root = tmp_path / "study" / "photos"
    assert seen["root"] == root
    for name, (w, h) in SYNTHETIC_SIZES.items():
        jpgs = sorted((root / name).glob("*.jpg"))
        assert jpgs and Image.open(jpgs[0]).size == (w, h)
    assert len(seen["medium"]) == 3
    assert seen["ocr"] is not None  # the broker experiment says why OCR is skipped
    (line,) = [e["message"] for e in events if e["event"] == "message"]
    assert "synthetic" in line and str(root) in line and "\n" not in line


def test_a_given_folder_without_sizes_is_an_error(tmp_path):
    (tmp_path / "photos").mkdir()
    config = StudyConfig(out=tmp_path / "s", images=tmp_path / "photos", only=["models"])
    with pytest.raises(StudyError, match="small/, medium/ and large/"):
        runner.run_study(config)
