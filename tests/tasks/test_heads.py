"""Segmentation, detection and depth heads against HuggingFace's own post-processing.

Tiny HF models with random weights (built from configs, nothing downloaded) run in torch on
real photos (landscape, a rotated portrait, a 40x30 thumbnail); the heads get the same raw
outputs as numpy rows and must agree with the image processors' ``post_process_*``.
Their speed at full photo sizes is measured in ``benchmarks/heads.py``, not here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvserve.images.preprocess import ImageMeta, Preprocessor
from cvserve.images.spec import PreprocessSpec
from cvserve.images.transforms import crop_box, resize_crop, resized_size
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.depth import DepthHead
from cvserve.tasks.detect import DetectHead, input_to_original, nms, original_to_input
from cvserve.tasks.encode import decode_array, decode_npz, encode_result
from cvserve.tasks.segment import SegmentHead, upsample_argmax

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = ["landscape", "portrait", "tiny"]


def _encode(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(data_dir: Path) -> dict[str, bytes]:
    root = data_dir / "images"
    land = (root / "medium" / "demo01.jpg").read_bytes()  # 2048 x 1362
    with Image.open(root / "small" / "dog.jpg") as im:
        portrait = _encode(im.convert("RGB").transpose(Image.Transpose.ROTATE_90))
    with Image.open(root / "small" / "giraffe.jpg") as im:
        tiny = _encode(im.convert("RGB").resize((40, 30), Image.Resampling.BILINEAR))
    return {"landscape": land, "portrait": portrait, "tiny": tiny}


def _meta(task: str, spec: PreprocessSpec, labels: int, **extra) -> ModelMeta:
    return ModelMeta(
        name=f"tiny-{task}",
        task=task,
        onnx_file="none.onnx",
        input_name="pixel_values",
        input_shape=[None, 3, spec.height, spec.width],
        input_dtype="float32",
        output_names=[],
        preprocess=spec,
        labels=[f"label{i}" for i in range(labels)],
        extra=extra,
    )


def _prep(spec: PreprocessSpec, data: bytes) -> tuple[torch.Tensor, ImageMeta]:
    out = np.empty(spec.input_shape, dtype=np.float32)
    meta = Preprocessor(spec, decoder="pil").run(data, out)
    return torch.from_numpy(out)[None], meta


def _rows(*tensors: torch.Tensor) -> list[np.ndarray]:
    return [t[0].detach().numpy() for t in tensors]


# --- segmentation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    cfg = SegformerConfig(
        num_labels=19,
        hidden_sizes=[8, 16, 24, 32],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=32,
    )
    return SegformerForSemanticSegmentation(cfg).eval()


@pytest.mark.parametrize("case", CASES)
def test_segment_matches_hf(segformer, images, case):
    from transformers import SegformerImageProcessor

    spec = PreprocessSpec(height=128, width=128, resize_mode="direct")
    x, meta = _prep(spec, images[case])
    with torch.no_grad():
        out = segformer(pixel_values=x)
    w, h = meta.orig_size
    ref = SegformerImageProcessor().post_process_semantic_segmentation(out, target_sizes=[(h, w)])
    ref = ref[0].numpy()
    res = SegmentHead(_meta("segment", spec, 19)).postprocess(_rows(out.logits), meta)
    mask = res["mask"]
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    if h + w > 128:  # torch's generic bilinear kernel: equal bit for bit
        assert int((mask != ref).sum()) == 0
    else:  # torch's separable path for small outputs rounds differently
        assert (mask != ref).mean() <= 1e-3
    fr = [c["fraction"] for c in res["classes"]]
    assert fr == sorted(fr, reverse=True) and abs(sum(fr) - 1) < 1e-9
    counts = np.bincount(mask.ravel(), minlength=19)
    for c in res["classes"]:
        assert c["fraction"] == pytest.approx(counts[c["index"]] / mask.size)
        assert c["label"] == f"label{c['index']}"


def test_upsample_argmax_exact_on_noise():
    """Candidate pruning gives torch's argmax on smooth logits and on noise (little
    pruning); more cases in test_segment.py."""
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    coarse = torch.from_numpy(rng.standard_normal((1, 40, 4, 4)).astype(np.float32)) * 4
    smooth = F.interpolate(coarse, size=(24, 24), mode="bicubic", align_corners=False)[0]
    for logits in (smooth.numpy(), rng.standard_normal((40, 24, 24)).astype(np.float32)):
        for size in ((97, 61), (13, 30), (24, 24)):
            ref = F.interpolate(torch.from_numpy(logits)[None], size=size, mode="bilinear")
            ref = ref[0].argmax(0).numpy()
            mask = upsample_argmax(logits, size)[0]
            if sum(size) > 128:  # torch's generic kernel, not its separable small path
                assert int((mask != ref).sum()) == 0
            else:
                assert (mask != ref).mean() <= 1e-3


@pytest.mark.parametrize("mode", ["shortest_edge_crop", "letterbox"])
@pytest.mark.parametrize("orig", [(2048, 1362), (534, 800), (40, 30)])
def test_segment_geometry(mode, orig):
    """Two classes split at model-input column ``xm``: the boundary lands where the
    preprocessing put that column in the original image; outside the crop is fill."""
    spec = PreprocessSpec(height=64, width=96, resize_mode=mode)
    w0, h0 = orig
    h, w = 16, 24  # logits at 1/4 of the input
    xm = 37.0  # model-input pixels
    xs = (np.arange(w) + 0.5) * (spec.width / w)  # logit pixel centres, input pixels
    logits = np.zeros((2, h, w), np.float32)
    logits[1] = (xs - xm)[None, :]
    meta = ImageMeta(orig_size=orig, format="PNG", reduced=1)
    res = SegmentHead(_meta("segment", spec, 2)).postprocess([logits], meta)
    mask = res["mask"]
    assert mask.shape == (h0, w0)
    rw, rh = resized_size(w0, h0, spec)
    left, top, right, bottom = crop_box(w0, h0, spec)
    # original pixel centres in model-input pixels
    cx = (np.arange(w0) + 0.5) * rw / w0 - left
    cy = (np.arange(h0) + 0.5) * rh / h0 - top
    inside = ((cy >= 0) & (cy <= spec.height))[:, None] & ((cx >= 0) & (cx <= spec.width))[None]
    assert (mask[~inside] == 255).all()
    want = np.broadcast_to((cx > xm)[None, :], mask.shape)
    # linear logits interpolate exactly except in the clamped border half-cells
    far = np.abs(cx - xm) > 1e-6
    sel = inside & far[None, :]
    assert (mask[sel] == want[sel]).all()
    assert {c["index"] for c in res["classes"]} <= {0, 1}


# --- detection ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rtdetr():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )
    cfg = RTDetrConfig(
        backbone_config=backbone,
        num_labels=10,
        d_model=32,
        encoder_hidden_dim=32,
        encoder_in_channels=[32, 64, 128],
        decoder_in_channels=[32, 32, 32],
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=30,
        num_denoising=0,
        use_pretrained_backbone=False,
    )
    return RTDetrForObjectDetection(cfg).eval()


@pytest.fixture(scope="module")
def yolos():
    from transformers import YolosConfig, YolosForObjectDetection

    torch.manual_seed(0)
    cfg = YolosConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[64, 96],
        patch_size=16,
        num_detection_tokens=10,
        num_labels=5,
    )
    return YolosForObjectDetection(cfg).eval()


def _compare_dets(res: dict, ref: dict) -> None:
    dets = res["detections"]
    assert len(dets) == len(ref["scores"])
    order = np.argsort(-ref["scores"].numpy(), kind="stable")
    for d, i in zip(dets, order, strict=True):
        assert d["score"] == pytest.approx(float(ref["scores"][i]), abs=1e-5)
        assert d["index"] == int(ref["labels"][i])
        assert np.abs(np.array(d["box"]) - ref["boxes"][i].numpy()).max() <= 0.5


@pytest.mark.parametrize("case", CASES)
def test_detect_rtdetr_matches_hf(rtdetr, images, case):
    from transformers import RTDetrImageProcessor

    spec = PreprocessSpec(height=160, width=160, resize_mode="direct")
    x, meta = _prep(spec, images[case])
    with torch.no_grad():
        out = rtdetr(pixel_values=x)
    w, h = meta.orig_size
    ref = RTDetrImageProcessor().post_process_object_detection(
        out, threshold=0.0, target_sizes=[(h, w)]
    )[0]
    head = DetectHead(_meta("detect", spec, 10, architecture="rt_detr"))
    assert head.score == "sigmoid"
    # random RT-DETR heads start at the focal-loss prior (scores ~0.01): keep all top-Q
    res = head.postprocess(_rows(out.logits, out.pred_boxes), meta, threshold=0.0)
    assert len(res["detections"]) == 30
    _compare_dets(res, ref)


@pytest.mark.parametrize("case", CASES)
def test_detect_yolos_matches_hf(yolos, images, case):
    from transformers import YolosImageProcessor

    spec = PreprocessSpec(height=64, width=96, resize_mode="direct")
    x, meta = _prep(spec, images[case])
    with torch.no_grad():
        out = yolos(pixel_values=x)
    w, h = meta.orig_size
    ref = YolosImageProcessor().post_process_object_detection(
        out, threshold=0.0, target_sizes=[(h, w)]
    )[0]
    head = DetectHead(_meta("detect", spec, 5, architecture="yolos"))
    assert head.score == "softmax"
    res = head.postprocess(_rows(out.logits, out.pred_boxes), meta, threshold=0.0)
    _compare_dets(res, ref)
    top = head.postprocess(_rows(out.logits, out.pred_boxes), meta, threshold=0.0, top_k=3)
    assert top["detections"] == res["detections"][:3]


@pytest.mark.parametrize("mode", ["direct", "letterbox", "shortest_edge_crop"])
@pytest.mark.parametrize("orig", [(2048, 1362), (534, 800), (40, 30)])
def test_box_round_trip(mode, orig):
    spec = PreprocessSpec(height=64, width=96, resize_mode=mode)
    w0, h0 = orig
    # boxes well inside the image (a centre crop keeps the middle)
    boxes = np.array(
        [[0.4 * w0, 0.4 * h0, 0.6 * w0, 0.55 * h0], [0.45 * w0, 0.3 * h0, 0.5 * w0, 0.7 * h0]]
    )
    inp = original_to_input(boxes, spec, orig)
    np.testing.assert_allclose(input_to_original(inp, spec, orig), boxes, atol=1e-9)
    # through the head: normalized cxcywh of the model input
    norm = inp / np.array([spec.width, spec.height] * 2)
    cxcywh = np.stack(
        [
            (norm[:, 0] + norm[:, 2]) / 2,
            (norm[:, 1] + norm[:, 3]) / 2,
            norm[:, 2] - norm[:, 0],
            norm[:, 3] - norm[:, 1],
        ],
        axis=1,
    ).astype(np.float32)
    logits = np.full((2, 4), -10, np.float32)
    logits[0, 1] = 5
    logits[1, 2] = 4
    head = DetectHead(_meta("detect", spec, 4, score="sigmoid"))
    meta = ImageMeta(orig_size=orig, format="PNG", reduced=1)
    dets = head.postprocess([logits, cxcywh], meta)["detections"]
    assert [d["index"] for d in dets] == [1, 2]
    got = np.array([d["box"] for d in dets])
    np.testing.assert_allclose(got, boxes, atol=0.5 * max(w0, h0) / 1e4 + 1e-3)


def test_letterbox_preprocess_geometry():
    """The letterboxed image sits top-left at the resized size; padding gets pad_value."""
    spec = PreprocessSpec(height=64, width=96, resize_mode="letterbox", extra={"pad_value": 114})
    im = Image.new("RGB", (40, 60), (200, 10, 10))
    rw, rh = resized_size(40, 60, spec)
    assert (rw, rh) == (43, 64)
    out = np.asarray(resize_crop(im, (40, 60), spec))
    assert out.shape == (64, 96, 3)
    assert (out[:, rw:] == 114).all()
    assert (out[:, : rw - 1] == (200, 10, 10)).all()
    same = PreprocessSpec(height=64, width=96, resize_mode="letterbox")
    assert resized_size(960, 640, same) == (96, 64)


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 9]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    spec = PreprocessSpec(height=10, width=10, resize_mode="direct")
    head = DetectHead(_meta("detect", spec, 3, score="sigmoid"))
    q = boxes.shape[0]
    logits = np.full((q, 3), -10, np.float32)
    logits[np.arange(q), [0, 0, 0, 1]] = np.log(scores / (1 - scores))
    cxcywh = (
        np.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2,
                (boxes[:, 1] + boxes[:, 3]) / 2,
                boxes[:, 2] - boxes[:, 0],
                boxes[:, 3] - boxes[:, 1],
            ],
            axis=1,
        ).astype(np.float32)
        / 40
    )
    meta = ImageMeta(orig_size=(40, 40), format="PNG", reduced=1)
    per_class = head.postprocess([logits, cxcywh], meta, nms_iou=0.5)["detections"]
    assert [d["query"] for d in per_class] == [3, 0, 2]  # query 3 has another label
    agnostic = head.postprocess([logits, cxcywh], meta, nms_iou=0.5, nms_class_agnostic=True)
    assert [d["query"] for d in agnostic["detections"]] == [3, 2]


# --- depth --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_anything():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
    )
    return DepthAnythingForDepthEstimation(cfg).eval()


@pytest.mark.parametrize("case", CASES)
def test_depth_matches_hf(depth_anything, images, case):
    from transformers import DPTImageProcessor

    spec = PreprocessSpec(height=56, width=70, resize_mode="direct", interpolation="bicubic")
    x, meta = _prep(spec, images[case])
    with torch.no_grad():
        out = depth_anything(pixel_values=x)
    w, h = meta.orig_size
    ref = DPTImageProcessor().post_process_depth_estimation(out, target_sizes=[(h, w)])
    ref = ref[0]["predicted_depth"].numpy()
    res = DepthHead(_meta("depth", spec, 0)).postprocess(_rows(out.predicted_depth), meta)
    depth = res["depth"]
    assert depth.shape == (h, w) and depth.dtype == np.float32
    scale = float(np.abs(ref).max())  # a Python float: pytest.approx rejects numpy scalars
    assert np.abs(depth - ref).max() <= 1e-4 * scale
    assert res["min"] == pytest.approx(float(ref.min()), abs=1e-4 * scale)
    assert res["max"] == pytest.approx(float(ref.max()), abs=1e-4 * scale)


# --- encoding -----------------------------------------------------------------------------


def test_encode_round_trip():
    rng = np.random.default_rng(0)
    h, w = 300, 200
    mask = rng.integers(0, 150, (h, w)).astype(np.uint8)
    mask16 = rng.integers(0, 300, (h, w)).astype(np.uint16)
    depth = rng.random((h, w)).astype(np.float32) * 7 + 0.5
    result = {
        "mask": mask,
        "classes": [{"index": np.int64(3), "label": "a", "fraction": np.float64(0.5)}],
        "sub": {"mask16": mask16},
        "depth": depth,
        "min": float(depth.min()),
    }
    body, ctype = encode_result(result, "application/json")
    assert ctype == "application/json"
    doc = json.loads(body)
    assert doc["classes"] == [{"index": 3, "label": "a", "fraction": 0.5}]
    assert doc["mask"]["encoding"] == "png8" and doc["sub"]["mask16"]["encoding"] == "png16"
    np.testing.assert_array_equal(decode_array(doc["mask"]), mask)
    np.testing.assert_array_equal(decode_array(doc["sub"]["mask16"]), mask16)
    dd = doc["depth"]
    assert dd["encoding"] == "png16-linear" and dd["shape"] == [h, w]
    back = decode_array(dd)
    assert back.dtype == np.float32
    assert np.abs(back - depth).max() <= (dd["max"] - dd["min"]) / 65535 * 0.5 + 1e-6

    body, ctype = encode_result(result, "application/x-npz, application/json;q=0.5")
    assert ctype == "application/x-npz"
    meta, arrays = decode_npz(body)
    np.testing.assert_array_equal(arrays["mask"], mask)
    np.testing.assert_array_equal(arrays["sub.mask16"], mask16)
    np.testing.assert_array_equal(arrays["depth"], depth)
    assert meta["mask"] == {"npz": "mask", "dtype": "uint8", "shape": [h, w]}
    assert meta["classes"][0]["index"] == 3
