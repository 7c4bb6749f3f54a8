"""``models add FILE --task T --output ROLE=NAME``: a user's ONNX file for any task, its
outputs mapped to the head's roles and checked against the file at add time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from cvserve.config import ModelConfig, ServerConfig  # noqa: E402
from cvserve.images.spec import PreprocessSpec  # noqa: E402
from cvserve.models import store  # noqa: E402
from cvserve.models.outputs import OutputMismatch, parse_mapping, resolve  # noqa: E402
from cvserve.serving.process import ServerThread, free_port  # noqa: E402

SPEC = PreprocessSpec(height=32, width=32, resize_mode="direct")


class Detector(torch.nn.Module):
    """Outputs in an order no head expects: an extra output, boxes, then class scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)  # 4x4 = 16 queries
        self.cls = torch.nn.Linear(8, 4)  # 3 classes + no-object
        self.box = torch.nn.Linear(8, 4)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)  # N, 16, 8
        return f.mean(-1), torch.sigmoid(self.box(f)), self.cls(f)


def _export(module, path: Path, names: list[str]) -> Path:
    torch.onnx.export(
        module.eval(), (torch.randn(1, 3, 32, 32),), str(path), input_names=["images"],
        output_names=names, dynamic_axes={k: {0: "n"} for k in ["images", *names]},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


@pytest.fixture
def detector(tmp_path) -> Path:
    return _export(Detector(), tmp_path / "det.onnx", ["aux", "boxes", "scores"])


def test_a_detector_with_mapped_outputs_is_stored_in_role_order_and_served(
    detector, tmp_path, data_dir
) -> None:
    cache = tmp_path / "c"
    meta = store.add_model(
        detector, "det", task="detect", spec=SPEC, labels=["a", "b", "c"], cache=cache,
        outputs={"logits": "scores", "pred_boxes": "boxes"},
    )  # fmt: skip
    assert meta.task == "detect" and meta.output_names == ["scores", "boxes"]
    assert meta.weights == "unknown"
    stored = onnx.load(str(store.model_path(meta, cache)))
    assert [o.name for o in stored.graph.output] == ["scores", "boxes"]
    cfg = ServerConfig(port=free_port(), cache_dir=str(cache), models=(ModelConfig("det"),))
    data = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with ServerThread(cfg) as srv:
        r = httpx.post(f"{srv.url}/v1/models/det:predict?threshold=0&top_k=3", content=data,
                       timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        dets = r.json()["detections"]
        assert len(dets) == 3 and {d["label"] for d in dets} <= {"a", "b", "c"}
        assert httpx.get(f"{srv.url}/v1/models/det").json()["weights"] == "unknown"


@pytest.mark.parametrize(
    ("task", "mapping", "labels", "message"),
    [
        ("detect", {"logits": "scores"}, None, "needs --output pred_boxes=NAME too"),
        ("detect", {"logits": "scores", "pred_boxes": "nope"}, None, "has no output 'nope'"),
        (
            "detect",
            {"logits": "aux", "pred_boxes": "boxes"},
            None,
            "(rank 2) but detect's logits has rank 3",
        ),
        ("detect", {"logits": "boxes", "pred_boxes": "scores"}, ["a"] * 3, "2 labels"),
        ("detect", None, None, "say which is which: --output logits=NAME --output pred_boxes"),
        ("segment", {"logits": "scores"}, None, "(rank 3) but segment's logits has rank 4"),
        ("classify", {"masks": "scores"}, None, "no output role 'masks'"),
        ("embed", {"embedding": "aux"}, None, None),
    ],
)
def test_mappings_are_checked_against_the_file(detector, tmp_path, task, mapping, labels,
                                               message) -> None:  # fmt: skip
    labels = ["a", "b"] if message == "2 labels" else labels
    if message is None:  # fits: (N, 16) is one vector per image
        meta = store.add_model(detector, "e", task=task, spec=SPEC, cache=tmp_path, outputs=mapping)
        assert meta.output_names == ["aux"]
        return
    with pytest.raises(store.InvalidModel) as e:
        store.add_model(detector, "x", task=task, spec=SPEC, labels=labels, cache=tmp_path,
                        outputs=mapping)  # fmt: skip
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "models" / "x" / "model.json").exists()


def test_outputs_named_like_the_roles_or_as_many_map_by_themselves() -> None:
    assert resolve("depth", [("d", [None, 1, 8, 8])]) == ["d"]
    declared = [("pred_boxes", [None, 5, 4]), ("logits", [None, 5, 3])]
    assert resolve("detect", declared) == ["logits", "pred_boxes"]
    assert parse_mapping(["logits=out0", " pred_boxes = out1"]) == {
        "logits": "out0", "pred_boxes": "out1"}  # fmt: skip
    with pytest.raises(OutputMismatch, match="ROLE=OUTPUT_NAME"):
        parse_mapping(["logits"])


def test_cli_add_with_task_and_outputs(detector, tmp_path) -> None:
    cmd = [sys.executable, "-m", "cvserve", "models", "add", str(detector), "--name", "det",
           "--task", "detect", "--size", "32", "--resize", "0", "--cache-dir", str(tmp_path),
           "--output", "logits=scores", "--output", "pred_boxes=boxes"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert store.load_meta("det", tmp_path).output_names == ["scores", "boxes"]
    bad = subprocess.run(cmd[:-2] + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert "needs --output pred_boxes=NAME too" in last
    ls = subprocess.run([sys.executable, "-m", "cvserve", "models", "list", "--cache-dir",
                         str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "weights" in ls.stdout and "unknown" in ls.stdout and "random" in ls.stdout
