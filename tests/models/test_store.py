"""The model store: layout, listing, lookup, builds in a child process, user ONNX files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cvserve.models
from cvserve.images.spec import PreprocessSpec
from cvserve.models import store
from cvserve.models.metadata import ModelMeta
from cvserve.models.zoo import ZOO


def test_public_names_are_pinned() -> None:
    assert cvserve.models.__all__ == [
        "ZOO",
        "InvalidModel",
        "ModelBuildError",
        "ModelEntry",
        "ModelMeta",
        "ModelNotBuilt",
        "ModelNotFound",
        "ZooEntry",
        "add_model",
        "build_from_dir",
        "cache_dir",
        "describe",
        "ensure_built",
        "fold_normalize",
        "list_models",
        "load_meta",
        "model_path",
    ]
    for name in cvserve.models.__all__:
        assert hasattr(cvserve.models, name)


# --- layout ---------------------------------------------------------------------------
def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CVSERVE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.cache_dir() == tmp_path / "home" / ".cache" / "cvserve"
    monkeypatch.setenv("CVSERVE_CACHE", str(tmp_path / "env"))
    assert store.cache_dir() == tmp_path / "env"
    assert store.cache_dir(tmp_path / "override") == tmp_path / "override"
    assert store.cache_dir(str(tmp_path / "s")) == tmp_path / "s"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "a..b", "-x", "x y"])
def test_invalid_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid model name"):
        store.validate_name(bad)


# --- lookup ---------------------------------------------------------------------------
def test_empty_store_lists_every_zoo_model_unbuilt(cache: Path) -> None:
    entries = store.list_models()
    assert [e.name for e in entries] == sorted(ZOO)
    assert all(not e.built and e.path is None for e in entries)
    assert {e.source for e in entries} == {f"zoo:{n}" for n in ZOO}
    assert {"resnet50", "resnet18", "mobilenet-v2", "vit-base", "tiny-resnet"} <= set(ZOO)


def test_unknown_name_raises_model_not_found_listing_names(cache: Path) -> None:
    with pytest.raises(store.ModelNotFound) as info:
        store.load_meta("no-such-model")
    assert info.value.name == "no-such-model"
    assert "resnet50" in str(info.value) and "tiny-resnet" in str(info.value)
    with pytest.raises(store.ModelNotFound):
        store.ensure_built("no-such-model")
    with pytest.raises(store.ModelNotFound):
        store.load_meta("../etc")  # an invalid name is just not found


def test_unbuilt_zoo_model_says_how_to_build_it(cache: Path) -> None:
    with pytest.raises(store.ModelNotBuilt, match="cvserve models build resnet50"):
        store.load_meta("resnet50")


def test_half_written_model_is_not_built(cache: Path) -> None:
    """An ONNX file without a sidecar (or the reverse) does not count as built."""
    folder = store.model_dir("tiny-resnet")
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"partial")
    assert not _entry("tiny-resnet").built
    (folder / "model.onnx").unlink()
    meta = _meta("tiny-resnet")
    store.write_meta(meta)
    assert not _entry("tiny-resnet").built  # sidecar but no ONNX file
    (folder / "model.onnx").write_bytes(b"x")
    assert _entry("tiny-resnet").built


def _entry(name: str) -> store.ModelEntry:
    return next(e for e in store.list_models() if e.name == name)


def _meta(name: str, **kw: object) -> ModelMeta:
    d = dict(
        name=name,
        task="classify",
        onnx_file="model.onnx",
        input_name="pixel_values",
        input_shape=[None, 3, 32, 32],
        input_dtype="float32",
        output_names=["logits"],
        preprocess=PreprocessSpec(height=32, width=32),
        source=f"zoo:{name}",
    )
    d.update(kw)
    return ModelMeta(**d)  # type: ignore[arg-type]


# --- zoo builds through the child process ----------------------------------------------
def test_built_model_is_listed_and_described(built_cache: Path) -> None:
    entries = {e.name: e for e in store.list_models(built_cache)}
    tiny = entries["tiny-resnet"]
    assert tiny.built and tiny.source == "zoo:tiny-resnet"
    assert tiny.path == built_cache / "models" / "tiny-resnet" / "model.onnx"
    assert not entries["resnet50"].built

    meta = store.load_meta("tiny-resnet", built_cache)
    assert store.model_path(meta, built_cache) == tiny.path
    d = store.describe(meta, built_cache)
    assert d["file_size"] == tiny.path.stat().st_size > 0
    assert d["path"] == str(tiny.path)
    assert d["preprocess"]["height"] == 32
    assert d["labels"] == [f"class_{i}" for i in range(10)]
    assert json.loads(json.dumps(d)) == d  # `models show` can print it as JSON


def test_ensure_built_on_a_built_model_never_imports_torch(built_cache: Path) -> None:
    code = textwrap.dedent(
        f"""
        import json, sys
        from cvserve.models import store
        lines = []
        meta = store.ensure_built("tiny-resnet", {str(built_cache)!r}, progress=lines.append)
        store.list_models({str(built_cache)!r})
        heavy = [m for m in ("torch", "transformers", "onnx") if m in sys.modules]
        print(json.dumps({{"name": meta.name, "heavy": heavy, "lines": lines}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result == {"name": "tiny-resnet", "heavy": [], "lines": []}


def test_concurrent_builds_of_one_model_build_it_once(cache: Path) -> None:
    pytest.importorskip("torch")
    code = textwrap.dedent(
        f"""
        from cvserve.models import store
        store.ensure_built("tiny-resnet", {str(cache)!r}, progress=print)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(o.count("exporting ONNX") for o in outs) == 1
    assert store.load_meta("tiny-resnet").name == "tiny-resnet"
    assert not list((cache / "models" / "tiny-resnet").glob(".*tmp*"))


def test_failed_build_raises_with_the_childs_reason(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without torch the child exits non-zero with the install hint, which reaches us."""
    fake = tmp_path / "no-torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(store.ModelBuildError) as info:
        store.ensure_built("tiny-resnet")
    assert "pip install 'cvserve[zoo]'" in str(info.value)
    assert info.value.returncode != 0
    assert not _entry("tiny-resnet").built


# --- user ONNX files --------------------------------------------------------------------
def _conv_classifier(path: Path, shape: list, n_classes: int = 4, elem: str = "FLOAT") -> Path:
    """A small real image classifier graph: conv -> global average pool -> flatten."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(n_classes, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", getattr(TensorProto, elem), shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", n_classes])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_add_model_registers_a_user_onnx_file(cache: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    src = _conv_classifier(tmp_path / "My Net.onnx", ["n", 3, 48, 48])
    spec = PreprocessSpec(height=48, width=48, resize_shortest=55, interpolation="bicubic")
    meta = store.add_model(src, spec=spec, labels=["a", "b", "c", "d"])

    assert meta.name == "My-Net"
    assert meta.source == f"user:{src.resolve()}"
    assert (meta.input_name, meta.input_shape, meta.input_dtype) == (
        "x",
        [None, 3, 48, 48],
        "float32",
    )
    assert meta.output_names == ["logits"]
    assert store.load_meta("My-Net") == meta
    assert store.load_meta("My-Net").preprocess.resize_shortest == 55
    path = store.model_path(meta)
    assert path.read_bytes() == src.read_bytes()
    entry = _entry("My-Net")
    assert entry.built and entry.source.startswith("user:") and entry.path == path
    # the stored copy runs
    x = np.zeros((2, 3, 48, 48), np.float32)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert out[0].shape == (2, 4)

    with pytest.raises(FileExistsError):
        store.add_model(src, name="My-Net", spec=spec)
    again = store.add_model(src, name="My-Net", spec=spec.replace(height=48), overwrite=True)
    assert again.labels == []


def test_add_model_with_a_dynamic_size_takes_the_spec(cache: Path, tmp_path: Path) -> None:
    src = _conv_classifier(tmp_path / "dyn.onnx", ["n", 3, "h", "w"])
    meta = store.add_model(src, spec=PreprocessSpec(height=64, width=80))
    assert meta.input_shape == [None, 3, None, None]
    assert (meta.preprocess.height, meta.preprocess.width) == (64, 80)


def test_add_model_rejects_a_two_input_model(cache: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "two.onnx"))
    with pytest.raises(store.InvalidModel, match="exactly one image input, has 2"):
        store.add_model(tmp_path / "two.onnx", spec=PreprocessSpec(height=8, width=8))
    assert not (cache / "models" / "two").exists()


@pytest.mark.parametrize(
    ("shape", "elem", "spec", "match"),
    [
        (["n", 3, 224, 224], "FLOAT", PreprocessSpec(height=256, width=256), r"axis 2: 224 != 256"),
        (["n", 1, 32, 32], "FLOAT", PreprocessSpec(height=32, width=32), r"axis 1: 1 != 3"),
        (["n", 32, 32], "FLOAT", PreprocessSpec(height=32, width=32), "rank 4"),
        (["n", 3, 32, 32], "INT64", PreprocessSpec(height=32, width=32), "float32 or uint8"),
        (
            ["n", 3, 32, 32],
            "FLOAT",
            PreprocessSpec(height=32, width=32, dtype="uint8"),
            "spec sends uint8",
        ),
    ],
)
def test_add_model_rejects_inputs_that_conflict_with_the_spec(
    cache: Path, tmp_path: Path, shape: list, elem: str, spec: PreprocessSpec, match: str
) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    t = getattr(TensorProto, elem)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "passthrough",
        [helper.make_tensor_value_info("x", t, shape)],
        [helper.make_tensor_value_info("y", t, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    with pytest.raises(store.InvalidModel, match=match):
        store.add_model(src, spec=spec)
    assert store.available_names() == sorted(ZOO)


def test_add_model_rejects_labels_that_do_not_match_the_classes(
    cache: Path, tmp_path: Path
) -> None:
    src = _conv_classifier(tmp_path / "m.onnx", ["n", 3, 16, 16], n_classes=4)
    with pytest.raises(store.InvalidModel, match="4 classes but 2 labels"):
        store.add_model(src, spec=PreprocessSpec(height=16, width=16), labels=["a", "b"])


def test_add_model_rejects_garbage_and_zoo_names(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(store.InvalidModel, match="onnxruntime cannot load"):
        store.add_model(tmp_path / "junk.onnx", spec=PreprocessSpec(height=8, width=8))
    src = _conv_classifier(tmp_path / "m.onnx", ["n", 3, 16, 16])
    with pytest.raises(ValueError, match="zoo model name"):
        store.add_model(src, name="resnet50", spec=PreprocessSpec(height=16, width=16))
    with pytest.raises(FileNotFoundError):
        store.add_model(tmp_path / "missing.onnx")


def test_a_hung_build_is_killed_at_the_timeout(cache: Path) -> None:
    with pytest.raises(store.ModelBuildError, match="timed out after 0.05 s"):
        store.ensure_built("tiny-resnet", timeout=0.05)
    assert not _entry("tiny-resnet").built


# --- user ONNX files with external data -------------------------------------------------
def _with_external_data(src: Path, folder: Path, location: str = "weights.bin") -> Path:
    """``src`` re-saved into ``folder`` with its weights in a separate file (ONNX external data)."""
    onnx = pytest.importorskip("onnx")
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    out = folder / "ext.onnx"
    onnx.save(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    assert (folder / location).is_file() and out.stat().st_size < src.stat().st_size
    return out


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of ``path`` at ``location`` (as a hostile file would)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))


def test_add_model_brings_external_weights_into_the_store(cache: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    plain = _conv_classifier(tmp_path / "plain.onnx", ["n", 3, 16, 16])
    src = _with_external_data(plain, tmp_path / "user")
    meta = store.add_model(src, name="ext", spec=PreprocessSpec(height=16, width=16))
    stored = store.model_path(meta)
    assert sorted(p.name for p in stored.parent.iterdir()) == ["model.json", "model.onnx"]

    x = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for p in (tmp_path / "user").iterdir():  # the user's folder is gone: the store has it all
        p.unlink()
    got = ort.InferenceSession(str(stored), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "missing"])
def test_add_model_refuses_external_data_outside_its_folder(
    cache: Path, tmp_path: Path, how: str
) -> None:
    plain = _conv_classifier(tmp_path / "plain.onnx", ["n", 3, 16, 16])
    folder = tmp_path / "user"
    src = _with_external_data(plain, folder)
    outside = tmp_path / "secret.bin"
    outside.write_bytes((folder / "weights.bin").read_bytes())
    if how == "dotdot":
        _relocate(src, "../secret.bin")
    elif how == "absolute":
        _relocate(src, str(outside))
    elif how == "symlink":
        (folder / "link.bin").symlink_to(outside)
        _relocate(src, "link.bin")
    else:
        _relocate(src, "nope.bin")
    match = "no such file" if how == "missing" else "inside the model's folder|leads out"
    with pytest.raises(store.InvalidModel, match=match):
        store.add_model(src, name="ext", spec=PreprocessSpec(height=16, width=16))
    assert not (cache / "models" / "ext" / "model.json").exists()
