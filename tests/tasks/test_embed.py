"""The embed task: one L2-normalised vector per image, as JSON, npz and a v2 FP32 tensor."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.base import get_head
from cvserve.tasks.encode import decode_npz, encode_result


def _meta() -> ModelMeta:
    return ModelMeta(
        name="e", task="embed", onnx_file="model.onnx", input_name="pixel_values",
        input_shape=[None, 3, 8, 8], input_dtype="float32", output_names=["image_embeds"],
        preprocess=PreprocessSpec(height=8, width=8),
    )  # fmt: skip


def _image() -> ImageMeta:
    return ImageMeta(orig_size=(10, 10), format="JPEG", reduced=1)


def test_head_normalises_and_answers_plain_json_and_npz() -> None:
    head = get_head(_meta())
    out = head.postprocess([np.array([3.0, 4.0], np.float32)], _image())
    body, ctype = encode_result(out)
    assert ctype == "application/json"
    assert body == b'{"embedding":[0.6000000238418579,0.800000011920929],"dim":2}'
    raw, ctype = encode_result(out, "application/x-npz")
    meta, arrays = decode_npz(raw)
    assert ctype == "application/x-npz" and meta["dim"] == 2
    assert arrays["embedding"].dtype == np.float32
    np.testing.assert_allclose(arrays["embedding"], [0.6, 0.8], rtol=1e-7)


def test_head_takes_the_first_token_and_keeps_raw_vectors_on_request() -> None:
    head = get_head(_meta())
    tokens = np.array([[1.0, 0.0, 0.0], [9.0, 9.0, 9.0]], np.float32)
    assert head.postprocess([tokens], _image())["embedding"].tolist() == [1.0, 0.0, 0.0]
    raw = head.postprocess([np.array([3.0, 4.0])], _image(), normalize=False)
    assert raw["embedding"].tolist() == [3.0, 4.0]
    zero = head.postprocess([np.zeros(4)], _image())
    assert zero["embedding"].tolist() == [0.0] * 4
    with pytest.raises(ValueError, match=r"must be \(D,\)"):
        head.postprocess([np.zeros((2, 2, 2))], _image())


@pytest.fixture(scope="module")
def embed_server(model_cache):
    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.models import store
    from cvserve.serving.process import ServerThread, free_port

    for name in ("tiny-clip", "tiny-dinov2"):
        store.ensure_built(name, model_cache)
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(model_cache),
        models=(ModelConfig("tiny-clip"), ModelConfig("tiny-dinov2")),
    )
    with ServerThread(cfg) as srv:
        yield srv


def test_zoo_encoders_serve_unit_vectors_over_v1_and_v2(embed_server, data_dir) -> None:
    th = pytest.importorskip("tritonclient.http", reason="needs the test extra")
    photos = [(data_dir / "images" / "small" / n).read_bytes() for n in ("dog.jpg", "eagle.jpg")]
    dims = {"tiny-clip": 16, "tiny-dinov2": 32}
    c = th.InferenceServerClient(embed_server.url.removeprefix("http://"), network_timeout=120)
    try:
        for model, dim in dims.items():
            v1 = []
            for data in photos:
                r = httpx.post(f"{embed_server.url}/v1/models/{model}:predict", content=data,
                               timeout=60)  # fmt: skip
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["dim"] == dim and len(body["embedding"]) == dim
                assert abs(np.linalg.norm(body["embedding"]) - 1) < 1e-5
                v1.append(body["embedding"])
            md = c.get_model_metadata(model)
            assert {"name": "embedding", "datatype": "FP32", "shape": [-1, -1]} in md["outputs"]
            inp = th.InferInput("IMAGE", [len(photos)], "BYTES")
            inp.set_data_from_numpy(np.array(photos, dtype=object))
            res = c.infer(model, [inp], outputs=[th.InferRequestedOutput("embedding")])
            got = res.as_numpy("embedding")
            assert got.dtype == np.float32 and got.shape == (2, dim)
            np.testing.assert_allclose(got, np.array(v1, np.float32), atol=1e-6)
        d = httpx.get(f"{embed_server.url}/v1/models/tiny-clip").json()
        assert d["task"] == "embed" and d["weights"] == "random"
    finally:
        c.close()
