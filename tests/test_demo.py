"""``cvserve demo`` explains its result: findings, refusals, next steps, synthetic photos."""

from __future__ import annotations

import shlex
from types import SimpleNamespace

from cvserve import demo


def _point(c, rps, mean, by_status=None, batch=1.0):  # noqa: ANN001, ANN202
    return SimpleNamespace(
        concurrency=c, load_label=f"c={c}", ok=100, throughput_rps=rps,
        latency_ms={"mean": mean}, mean_batch_size=batch,
        errors={"total": sum((by_status or {}).values()), "by_status": by_status or {}},
        breakdown_pct={"decode": 30.0, "resize": 5.0, "normalize": 1.0, "infer": 50.0,
                       "queue": 4.0, "batch_wait": 6.0},
    )  # fmt: skip


def test_findings_say_where_the_time_went():
    result = SimpleNamespace(points=[_point(1, 30.0, 33.0), _point(16, 40.0, 400.0, batch=7.5)])
    text = " ".join(demo.findings(result))
    assert "At c=1, a request took 33 ms" in text and "36% decoding" in text
    assert "50% in the DNN" in text and "from 30.0 to 40.0 req/s (1.33x)" in text
    assert "Batches held 7.5 images" in text
    assert "429" not in text  # nothing refused, nothing to explain


def test_a_429_is_explained():
    result = SimpleNamespace(points=[_point(1, 30.0, 33.0), _point(16, 40, 400, {"429": 12})])
    (note,) = demo.refusal_notes(result)
    assert note.startswith("12 requests at c=16 got 429")
    assert "deadline" in note and "normally queued, not refused" in note
    assert "Retry-After" in note and "Admission" in note
    (deep,) = demo.refusal_notes(SimpleNamespace(points=[_point(100, 40, 900, {"429": 3})]))
    assert "--max-queue (64)" in deep
    assert demo.findings(result)[-1] == note


def test_next_steps_parse(tmp_path):
    from cvserve.cli import build_parser

    steps = demo.next_steps("resnet18", tmp_path / "a b", "/data/images/medium")
    assert len(steps) >= 4
    for _, command in steps:
        for part in command.split("&&"):
            words = shlex.split(part)
            if words[0] == "cvserve":
                build_parser().parse_args(words[1:])  # exits (fails) on a bad flag


def test_without_shared_photos_it_writes_synthetic_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "default_images", lambda: None)
    said = []
    folder = demo.demo_images(tmp_path / "out", say=said.append)
    assert folder == tmp_path / "out" / "photos"
    jpgs = sorted(folder.glob("*.jpg"))
    assert len(jpgs) == 8 and all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in jpgs)
    assert "synthetic" in said[0] and str(folder) in said[0]


def test_wrap_command_keeps_quoted_words_whole():
    from cvserve.cli.demo import wrap_command

    cmd = "curl -i --data-binary @photo.jpg -H 'content-type: image/jpeg' " + "http://x/" * 8
    text = wrap_command(cmd, 60, indent="    ")
    assert all(len(line) <= 60 for line in text.splitlines()[:-1])
    assert "'content-type: image/jpeg'" in text
    joined = text.replace(" \\\n", " ")
    assert shlex.split(joined) == shlex.split(cmd)
