"""A head of your own (``head: package.module:Class``): checked at start-up with one line
saying what is wrong, then served through the real server's three doors with cvserve's
decoding, batching, parameters and stage timing; ``examples/custom_head`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from cvserve.config import ModelConfig, ServerConfig
from cvserve.config.checks import ConfigError
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.base import HeadError, load_head
from cvserve.trace import parse_server_timing

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_head"
HEAD = "open_set:OpenSetClassifier"
MODEL = "tiny-resnet"

BROKEN = """
from cvserve.tasks.params import Param

class NoPost:
    task = "x"
    params = ()
    heavy = False

class BadParams:
    task = "x"
    params = ("threshold",)
    heavy = "no"
    def postprocess(self, outputs, meta, **params):
        return {}

class BadSignature:
    task = "x"
    params = (Param("k", int, 1),)
    heavy = False
    def postprocess(self, outputs):
        return {}

class Fine:
    task = "fine"
    params = (Param("k", int, 1),)
    heavy = False
    def postprocess(self, outputs, meta, k=1):
        return {"k": k}

raise_on_import = False
"""


@pytest.fixture
def heads_dir(tmp_path, monkeypatch):
    (tmp_path / "my_heads.py").write_text(BROKEN)
    (tmp_path / "crashes.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("my_heads.Fine", "name it as package.module:Class"),
        ("no_such_module_here:Head", "cannot import no_such_module_here: ModuleNotFoundError"),
        ("crashes:Head", "cannot import crashes: RuntimeError: boom"),
        ("my_heads:Missing", "module my_heads has no Missing"),
        ("my_heads:raise_on_import", "raise_on_import is not a class"),
        ("my_heads:NoPost", "no postprocess(outputs, meta, **params) method"),
        ("my_heads:BadParams", "params must be a tuple of cvserve.tasks.params.Param"),
        ("my_heads:BadParams", "heavy must be True or False"),
        ("my_heads:BadSignature", "postprocess(self, outputs, meta, **params) does not fit"),
    ],
)
def test_a_head_that_is_not_one_is_one_line(heads_dir, ref, says):
    with pytest.raises(HeadError) as e:
        load_head(ref)
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="model 'm': head "):
        ModelConfig("m", head=ref)


def test_a_fine_head_loads(heads_dir):
    assert load_head("my_heads:Fine").task == "fine"
    assert ModelConfig("m", head="my_heads:Fine").head == "my_heads:Fine"


def test_serve_refuses_a_broken_head_in_one_line(model_cache):
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "serve", "--model", MODEL, "--cache-dir",
         str(model_cache), "--head", "no_such_module_here:Head", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "no_such_module_here" in ln]
    assert len(lines) == 1 and "cannot import" in lines[0], r.stderr


@pytest.fixture(scope="module")
def example_server(model_cache):
    sys.path.insert(0, str(EXAMPLE))
    try:
        cfg = ServerConfig(
            port=free_port(),
            grpc_port=0,
            cache_dir=str(model_cache),
            models=(ModelConfig(MODEL, head=HEAD),),
        )
        with ServerThread(cfg) as srv:
            yield srv
    finally:
        sys.path.remove(str(EXAMPLE))


def _reference(model_cache, data: bytes, temperature: float = 1.0) -> np.ndarray:
    """The classifier's probabilities with the head's direct resize, computed here."""
    import onnxruntime as ort

    from cvserve.images.preprocess import Preprocessor
    from cvserve.models import store

    meta = store.load_meta(MODEL, model_cache)
    spec = meta.preprocess.replace(resize_mode="direct")
    x = np.empty((1, *spec.input_shape), np.float32)
    Preprocessor(spec).run(data, x[0])
    sess = ort.InferenceSession(str(store.model_path(meta, model_cache)))
    logits = sess.run(None, {meta.input_name: x})[0][0].astype(np.float64) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def test_the_example_head_through_v1(example_server, model_cache, data_dir):
    data = (data_dir / "images/small/dog.jpg").read_bytes()
    with httpx.Client(base_url=example_server.url, timeout=60) as c:
        desc = c.get(f"/v1/models/{MODEL}").json()
        assert desc["task"] == "open_set" and desc["head"] == HEAD
        assert desc["preprocess"]["resize_mode"] == "direct"  # the head's own preprocessing
        assert {p["name"] for p in desc["parameters"]} == {"min_confidence", "temperature", "top_k"}

        r = c.post(f"/v1/models/{MODEL}:predict?top_k=4&temperature=0.5", content=data)
        assert r.status_code == 200, r.text
        stages, bad = parse_server_timing(r.headers["server-timing"])
        assert bad == 0 and {"decode", "resize", "infer", "postprocess"} <= set(stages)
        body = r.json()
        assert body["task"] == "open_set"
        p = _reference(model_cache, data, temperature=0.5)
        assert body["confidence"] == pytest.approx(p.max(), rel=1e-4)
        assert len(body["alternatives"]) == 4
        assert body["image"] == {"width": 800, "height": 534}
        # a random-weight classifier is never confident: unknown, unless asked for less
        assert body["label"] == "unknown" and body["known"] is False
        low = c.post(f"/v1/models/{MODEL}:predict?min_confidence=0", content=data).json()
        assert low["known"] is True and low["label"] == low["alternatives"][0]["label"]

        bad_param = c.post(f"/v1/models/{MODEL}:predict?min_confidence=2", content=data)
        assert bad_param.status_code == 400 and "min_confidence" in bad_param.text
        unknown = c.post(f"/v1/models/{MODEL}:predict?threshold=0.1", content=data)
        assert unknown.status_code == 400 and "unknown parameter" in unknown.text


def test_the_example_head_through_v2_http_and_grpc(example_server, data_dir):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    data = (data_dir / "images/small/person.jpg").read_bytes()
    v1 = httpx.post(
        f"{example_server.url}/v1/models/{MODEL}:predict?top_k=2", content=data, timeout=60
    ).json()
    v1.pop("task", None)
    v1.pop("model", None)

    hi = th.InferInput("IMAGE", [1], "BYTES")
    hi.set_data_from_numpy(np.array([data], dtype=object))
    with th.InferenceServerClient(example_server.url.removeprefix("http://")) as c:
        res = c.infer(MODEL, [hi], outputs=[th.InferRequestedOutput("result")],
                      parameters={"top_k": 2})  # fmt: skip
        http_answer = json.loads(res.as_numpy("result")[0])

    gi = tg.InferInput("IMAGE", [1], "BYTES")
    gi.set_data_from_numpy(np.array([data], dtype=object))
    with tg.InferenceServerClient(example_server.grpc_target) as c:
        res = c.infer(MODEL, [gi], outputs=[tg.InferRequestedOutput("result")],
                      parameters={"top_k": 2})  # fmt: skip
        grpc_answer = json.loads(res.as_numpy("result")[0])

    for answer in (http_answer, grpc_answer):
        assert [a["label"] for a in answer["alternatives"]] == [
            a["label"] for a in v1["alternatives"]
        ]
        assert [a["p"] for a in answer["alternatives"]] == pytest.approx(
            [a["p"] for a in v1["alternatives"]], rel=1e-6
        )
        assert answer["confidence"] == pytest.approx(v1["confidence"], rel=1e-6)
        assert answer["image"] == v1["image"]
