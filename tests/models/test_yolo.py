"""Ultralytics YOLO exports: built offline from the architecture files (random weights,
BatchNorm recalibrated on the shared photos), added with ``models add`` (recognised from
the file's metadata), served through the real server, and compared with Ultralytics' own
``predict`` on the same ONNX file: boxes within 1 px, same labels, mask IoU >= 0.98,
keypoints within 1 px."""

from __future__ import annotations

import sys

import httpx
import numpy as np
import pytest

from cvserve.config import ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port
from cvserve.tasks.encode import decode_array
from cvserve.trace import parse_server_timing

pytestmark = pytest.mark.zoo

ARCHS = {"yolo_detect": "yolo11n", "yolo_segment": "yolo11n-seg", "yolo_pose": "yolo11n-pose"}
CALIBRATION = [
    "images/small/dog.jpg",
    "images/small/person.jpg",
    "images/small/groceries.jpg",
    "images/small/giraffe.jpg",
    "images/medium/kite.jpg",
    "images/medium/truck.jpg",
    "images/small/eagle.jpg",
    "images/small/rocket.jpg",
]
#: small, medium, a rotated-by-EXIF one and a tiny one: every letterbox case (wide, tall
#: after rotation, square)
PHOTOS = [
    "images/small/person.jpg",
    "images/small/giraffe.jpg",
    "images/medium/kite.jpg",
    "images/medium/demo04.jpg",
    "bad/hopper_orientation_6.jpg",
]


def _ultralytics():
    pytest.importorskip("torch", reason="building YOLO models needs the zoo extra")
    from cvserve.models.yolo import ultralytics_offline

    with ultralytics_offline():
        import ultralytics
    return ultralytics


@pytest.fixture(scope="module")
def yolo_files(tmp_path_factory, data_dir):
    _ultralytics()
    from cvserve.models import yolo

    out = tmp_path_factory.mktemp("yolo")
    photos = [data_dir / p for p in CALIBRATION]
    return {
        task: yolo.build(arch, out / f"{arch}.onnx", photos=photos) for task, arch in ARCHS.items()
    }


@pytest.fixture(scope="module")
def yolo_cache(tmp_path_factory, yolo_files):
    from cvserve.models import store

    cache = tmp_path_factory.mktemp("yolo-cache")
    for task, path in yolo_files.items():
        meta = store.add_model(path, name=ARCHS[task], cache=cache)
        assert meta.task == task and meta.preprocess.resize_mode == "letterbox_center"
    return cache


@pytest.fixture(scope="module")
def yolo_server(yolo_cache):
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(yolo_cache),
        models=tuple(ModelConfig(arch) for arch in ARCHS.values()),
    )
    with ServerThread(cfg) as srv:
        yield srv


def _reference(path, photo, **kw):
    from cvserve.models.yolo import read_export, ultralytics_offline

    ultralytics = _ultralytics()
    with ultralytics_offline():
        model = ultralytics.YOLO(str(path), task=read_export(path).extra["ultralytics_task"])
        return model.predict(str(photo), verbose=False, **kw)[0]


def _match(ours: list[dict], ref) -> list[tuple[dict, int]]:
    """Pairs (our detection, Ultralytics' row): equal counts, and each of ours has its own
    row with the same label and score whose box is within 1 px (rows of equal scores may
    come in either order)."""
    data = ref.boxes.data.numpy()
    assert len(ours) == len(data), (len(ours), len(data))
    free = np.ones(len(data), bool)
    pairs = []
    for d in ours:
        box = np.array(d["box"])
        fits = (
            free
            & (data[:, 5] == d["index"])
            & (np.abs(data[:, 4] - d["score"]) < 1e-4)
            & (np.abs(data[:, :4] - box).max(axis=1) <= 1.0)
        )
        assert fits.any(), (d, data[np.abs(data[:, 4] - d["score"]) < 1e-3])
        i = int(np.flatnonzero(fits)[0])
        assert d["label"] == ref.names[int(data[i, 5])]
        free[i] = False
        pairs.append((d, i))
    return pairs


def _post(srv, model: str, data: bytes, query: str = "") -> httpx.Response:
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post(f"/v1/models/{model}:predict{query}", content=data)
    assert r.status_code == 200, r.text
    stages, bad = parse_server_timing(r.headers["server-timing"])
    assert bad == 0 and {"decode", "resize", "infer", "postprocess"} <= set(stages)
    return r


def test_preprocessing_is_ultralytics_letterbox(data_dir):
    """letterbox_center + cv2_linear make the very pixels Ultralytics' LetterBox makes."""
    import cv2

    from cvserve.images.preprocess import Preprocessor
    from cvserve.models.yolo import ultralytics_offline, yolo_spec

    _ultralytics()
    with ultralytics_offline():
        from ultralytics.data.augment import LetterBox

    for size in ((640, 640), (480, 640)):
        spec = yolo_spec(*size)
        pre = Preprocessor(spec)  # the default decoder: cv2_linear decodes at full size
        for p in PHOTOS + ["images/large/jolla.jpg"]:
            x = np.zeros(spec.input_shape, np.float32)
            pre.run((data_dir / p).read_bytes(), x)
            ref = LetterBox(size, auto=False)(image=cv2.imread(str(data_dir / p)))
            ref = ref[..., ::-1].transpose(2, 0, 1).astype(np.float32) / 255
            assert np.abs(x - ref).max() < 1e-6, (p, size)


@pytest.mark.parametrize("photo", PHOTOS)
def test_detect_answers_as_ultralytics(yolo_server, yolo_files, data_dir, photo):
    r = _post(yolo_server, "yolo11n", (data_dir / photo).read_bytes())
    ours = r.json()["detections"]
    _match(ours, _reference(yolo_files["yolo_detect"], data_dir / photo))


def test_detect_parameters_are_ultralytics_arguments(yolo_server, yolo_files, data_dir):
    photo = data_dir / "images/medium/demo04.jpg"
    q = "?threshold=0.1&nms_iou=0.5&top_k=20&nms_class_agnostic=true"
    ours = _post(yolo_server, "yolo11n", photo.read_bytes(), q).json()["detections"]
    ref = _reference(yolo_files["yolo_detect"], photo, conf=0.1, iou=0.5, max_det=20,
                     agnostic_nms=True)  # fmt: skip
    assert len(ours) == 20  # enough boxes for the parameters to matter
    _match(ours, ref)


@pytest.mark.parametrize("photo", PHOTOS)
def test_segment_answers_as_ultralytics(yolo_server, yolo_files, data_dir, photo):
    data = (data_dir / photo).read_bytes()
    ours = _post(yolo_server, "yolo11n-seg", data, "?mask=full").json()["detections"]
    ref = _reference(yolo_files["yolo_segment"], data_dir / photo, retina_masks=True)
    masks = ref.masks.data.numpy() > 0 if ref.masks is not None else None
    for d, i in _match(ours, ref):
        ours_mask = decode_array(d["mask"]).astype(bool)
        assert ours_mask.shape == ref.orig_shape
        iou = (ours_mask & masks[i]).sum() / (ours_mask | masks[i]).sum()
        assert iou >= 0.98, (photo, i, iou)
    if ours:  # the default answer: each mask over its box, placed by mask_origin
        boxed = _post(yolo_server, "yolo11n-seg", data).json()["detections"][0]
        m = decode_array(boxed["mask"])
        x0, y0 = boxed["mask_origin"]
        full = decode_array(ours[0]["mask"])
        assert (full[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]] == m).all()
        assert full.sum() == m.sum()


@pytest.mark.parametrize("photo", PHOTOS)
def test_pose_answers_as_ultralytics(yolo_server, yolo_files, data_dir, photo):
    ours = _post(yolo_server, "yolo11n-pose", (data_dir / photo).read_bytes()).json()
    ref = _reference(yolo_files["yolo_pose"], data_dir / photo)
    kpts = ref.keypoints.data.numpy() if ref.keypoints is not None else None
    for d, i in _match(ours["detections"], ref):
        k = np.array(d["keypoints"])
        assert k.shape == (17, 3)
        assert np.abs(k[:, :2] - kpts[i, :, :2]).max() <= 1.0
        assert np.abs(k[:, 2] - kpts[i, :, 2]).max() < 1e-3


def test_every_task_finds_something(yolo_server, data_dir):
    """The comparisons above compare real detections, not empty lists."""
    found = {}
    for arch in ARCHS.values():
        found[arch] = sum(
            len(_post(yolo_server, arch, (data_dir / p).read_bytes()).json()["detections"])
            for p in PHOTOS
        )
    assert all(n > 0 for n in found.values()), found


def test_models_add_refuses_what_it_cannot_serve(yolo_files, tmp_path):
    import onnx

    from cvserve.models import store

    proto = onnx.load(str(yolo_files["yolo_detect"]))
    props = {p.key: p for p in proto.metadata_props}
    props["task"].value = "obb"
    onnx.save(proto, str(tmp_path / "obb.onnx"))
    with pytest.raises(store.InvalidModel, match="Ultralytics 'obb' export"):
        store.add_model(tmp_path / "obb.onnx", cache=tmp_path / "c")
    props["task"].value = "detect"
    props["names"].value = "{0: 'a', 1: 'b'}"
    onnx.save(proto, str(tmp_path / "two.onnx"))
    with pytest.raises(store.InvalidModel, match=r"2 classes should output \(batch, 6, anchors\)"):
        store.add_model(tmp_path / "two.onnx", cache=tmp_path / "c")
    # an explicit task is the user's choice, checked against the file's outputs like any
    # other ONNX file: a detector's [1, 84, 8400] is no classifier's logits
    from cvserve.images.spec import PreprocessSpec

    spec = PreprocessSpec(640, 640, resize_mode="direct")
    with pytest.raises(store.InvalidModel, match=r"classify's logits has rank 2"):
        store.add_model(yolo_files["yolo_detect"], task="classify", spec=spec,
                        cache=tmp_path / "c")  # fmt: skip


def test_ultralytics_patches_are_undone(yolo_files):
    """Importing ultralytics patches PIL.Image.open process-wide (a HEIF plugin fetched on
    the first unidentified image): cvserve's decoding must stay Pillow's own."""
    from PIL import Image

    from cvserve.images.decode import UndecodableImage, decode

    _ultralytics()
    assert Image.open.__module__.startswith("PIL")
    # the torchvision stand-in is gone too: transformers' image processors look for it
    assert "torchvision" not in sys.modules or sys.modules["torchvision"].__spec__ is not None
    with pytest.raises(UndecodableImage):
        decode(b"\x89PNG\r\n\x1a\nbroken")


def test_cli_models_add_needs_no_flags_for_an_export(yolo_files, tmp_path, capsys):
    from cvserve.cli import main
    from cvserve.models import store

    cache = tmp_path / "cli"
    assert main(["models", "add", str(yolo_files["yolo_pose"]), "--name", "pose",
                 "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert "added pose (yolo_pose)" in capsys.readouterr().out
    meta = store.load_meta("pose", cache)
    assert meta.labels == ["person"] and meta.extra["kpt_shape"] == [17, 3]
    assert meta.preprocess.extra["pad_value"] == 114
