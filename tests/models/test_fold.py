"""Normalization folded into the graph: uint8 in, the float path's outputs out."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.images.preprocess import Preprocessor
from cvserve.models import InvalidModel, fold_normalize, load_meta, model_path
from cvserve.runtime import OrtRuntime


def test_folded_model_equals_float_path(model_cache, data_dir):
    pytest.importorskip("onnx")
    folded = fold_normalize("tiny-resnet", cache=model_cache, overwrite=True)
    base = load_meta("tiny-resnet", model_cache)
    assert folded.name == "tiny-resnet-u8" and folded.input_dtype == "uint8"
    assert folded.preprocess.dtype == "uint8"
    assert folded.preprocess.replace(dtype="float32") == base.preprocess
    rf = OrtRuntime(model_path(base, model_cache))
    ru = OrtRuntime(model_path(folded, model_cache))
    assert ru.input_dtype == "uint8" and ru.input_name == rf.input_name
    # Both through Pillow's 8-bit resize (fused=False): the fused pass gives a float slot the
    # fraction an 8-bit pixel rounds away, and the models would differ by that input, not by
    # the fold this test checks.
    pf = Preprocessor(base.preprocess, fused=False)
    pu = Preprocessor(folded.preprocess, fused=False)
    photos = sorted((data_dir / "images").glob("*/*.jpg"))[::3]
    xf = np.empty((len(photos), *base.preprocess.input_shape), np.float32)
    xu = np.empty((len(photos), *base.preprocess.input_shape), np.uint8)
    for i, p in enumerate(photos):
        data = p.read_bytes()
        pf.run(data, xf[i])
        pu.run(data, xu[i])
    a, b = rf.run(xf)[0], ru.run(xu)[0]
    assert np.abs(a).max() > 1e-3  # outputs carry signal, the comparison means something
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_folding_twice_is_refused(model_cache):
    pytest.importorskip("onnx")
    fold_normalize("tiny-resnet", cache=model_cache, overwrite=True)
    with pytest.raises(InvalidModel):
        fold_normalize("tiny-resnet-u8", cache=model_cache)
