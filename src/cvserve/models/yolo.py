"""Ultralytics YOLO exports: recognising one, and building one offline.

:func:`read_export` reads the metadata Ultralytics writes into every ONNX export (``task``,
``names``, ``imgsz``, ``stride``, ``kpt_shape``) with ``onnx`` alone, and says which cvserve
task serves it (``yolo_detect``, ``yolo_segment``, ``yolo_pose``) with Ultralytics' own
preprocessing: its centred letterbox (``letterbox_center``: pad value 114, OpenCV's
``INTER_LINEAR`` resize, RGB scaled to 0..1). Serving never imports ultralytics.

:func:`build` (the ``zoo`` extra: ultralytics, torch) makes an export from an architecture
file (``yolo11n.yaml``, ``yolo11n-seg.yaml``, ``yolo11n-pose.yaml``) with random weights
and never downloads anything: a random YOLO scores every box the same, so its BatchNorm
statistics are recalibrated with one train-mode forward pass over a few photos first (then
scores and labels vary and a comparison with Ultralytics' predictions means something).
``python -m cvserve.models.yolo yolo11n --out yolo11n.onnx`` runs it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import os
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec

#: Ultralytics' task names -> the cvserve task serving them.
TASKS = {"detect": "yolo_detect", "segment": "yolo_segment", "pose": "yolo_pose"}
#: Architecture files :func:`build` accepts (shipped inside the ultralytics package).
ARCHS = ("yolo11n", "yolo11n-seg", "yolo11n-pose", "yolov8n", "yolov8n-seg", "yolov8n-pose")
#: Ultralytics' letterbox padding value.
PAD_VALUE = 114
_REAL_VERSION = importlib.metadata.version


@dataclass
class YoloExport:
    """What an Ultralytics ONNX export says about itself."""

    task: str  # the cvserve task: yolo_detect, yolo_segment, yolo_pose
    labels: list[str]
    imgsz: tuple[int, int]  # (height, width)
    stride: int
    kpt_shape: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> PreprocessSpec:
        return yolo_spec(*self.imgsz)


def yolo_spec(height: int = 640, width: int = 640) -> PreprocessSpec:
    """Ultralytics' predict preprocessing for a fixed-size export: centred letterbox with
    pad 114 and OpenCV's bilinear resize, RGB, ``x / 255``, no mean/std."""
    return PreprocessSpec(
        height=height,
        width=width,
        resize_mode="letterbox_center",
        interpolation="cv2_linear",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        extra={"pad_value": PAD_VALUE},
    )


def read_export(path: Path | str) -> YoloExport | None:
    """The export's description, or None when ``path`` is not an Ultralytics export (no
    ``author: Ultralytics`` / ``task`` metadata). Raises ValueError for an Ultralytics task
    cvserve does not serve (classify, obb) or metadata it cannot read."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    props = {p.key: p.value for p in proto.metadata_props}
    if "task" not in props or "names" not in props or "Ultralytics" not in props.get("author", ""):
        return None
    task = props["task"]
    if task not in TASKS:
        raise ValueError(
            f"{path}: an Ultralytics {task!r} export; cvserve serves YOLO "
            f"{', '.join(TASKS)} exports"
        )
    try:
        names = ast.literal_eval(props["names"])
        imgsz = ast.literal_eval(props.get("imgsz", "[640, 640]"))
        kpt = ast.literal_eval(props["kpt_shape"]) if "kpt_shape" in props else None
        end2end = ast.literal_eval(props.get("end2end", "False"))
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable Ultralytics metadata: {e}") from None
    if isinstance(imgsz, int):
        imgsz = [imgsz, imgsz]
    labels = [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else list(names)
    _check_outputs(path, proto, task, len(labels), kpt)
    if end2end:
        raise ValueError(
            f"{path}: an end-to-end (NMS-free) Ultralytics export; export it with "
            "end2end=False (cvserve runs the NMS)"
        )
    return YoloExport(
        task=TASKS[task],
        labels=labels,
        imgsz=(int(imgsz[0]), int(imgsz[1])),
        stride=int(props.get("stride", 32)),
        kpt_shape=tuple(int(v) for v in kpt) if kpt else None,  # type: ignore[arg-type]
        extra={
            "family": "ultralytics",
            "ultralytics_task": task,
            "ultralytics_version": props.get("version", ""),
            "stride": int(props.get("stride", 32)),
            **({"kpt_shape": [int(v) for v in kpt]} if kpt else {}),
        },
    )


def _check_outputs(path: Path | str, proto: Any, task: str, classes: int, kpt: Any) -> None:
    """The graph's outputs are what ``task`` with ``classes`` classes makes, or one line
    saying what does not match."""
    dims = [
        [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
        for o in proto.graph.output
    ]
    extra = {"detect": 0, "segment": 32, "pose": int(kpt[0]) * int(kpt[1]) if kpt else 51}[task]
    want = 4 + classes + extra
    need = 2 if task == "segment" else 1
    if len(dims) < need or len(dims[0]) != 3 or dims[0][1] not in (None, want):
        raise ValueError(
            f"{path}: an Ultralytics {task} export with {classes} classes should output "
            f"(batch, {want}, anchors){' and mask prototypes' if need == 2 else ''}; "
            f"its outputs are {dims}"
        )


# --- building (the zoo extra) ---------------------------------------------------------
@contextlib.contextmanager
def ultralytics_offline(config_dir: Path | str | None = None) -> Iterator[None]:
    """Make ``import ultralytics`` work here, offline and quietly.

    Ultralytics reads torchvision's version from package metadata at import and imports
    torchvision for NMS; where torchvision is missing or cannot load beside this torch (a
    CUDA build next to torch+cpu: "operator torchvision::nms does not exist"), a stand-in
    module whose ``ops.nms`` is Ultralytics' own ``TorchNMS.nms`` (which matches
    torchvision's) takes its place. ``YOLO_OFFLINE`` stops every download and online check;
    settings go to ``config_dir`` (a temporary folder by default). The functions the import
    of ultralytics patches process-wide, and the stand-in, are undone when the block ends:
    run Ultralytics' predict inside such a block too."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    if config_dir is None and "YOLO_CONFIG_DIR" not in os.environ:
        config_dir = tempfile.mkdtemp(prefix="cvserve-ultralytics-")
    if config_dir is not None:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    stand_in = False
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:  # ModuleNotFoundError, or RuntimeError from a mismatched build
            for name in [m for m in sys.modules if m.startswith("torchvision")]:
                del sys.modules[name]
            _install_torchvision_stand_in()
            stand_in = True
    real_nms = None
    if not stand_in:  # a torchvision that imports (models.torchvision_compat) with no ops
        import torchvision

        if not _nms_runs(torchvision):
            real_nms, torchvision.ops.nms = torchvision.ops.nms, _torch_nms
    # Importing ultralytics patches PIL.Image.open (to fetch a HEIF plugin), cv2.imread /
    # imwrite / imshow and torch.save for the whole process: put the originals back when
    # the block ends, so cvserve's decoding (and anything else here) is untouched.
    saved = _originals() if "ultralytics" not in sys.modules else {}
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)
        if real_nms is not None:
            torchvision.ops.nms = real_nms
        if stand_in:  # others (transformers) must not mistake it for torchvision
            sys.modules.pop("torchvision", None)
            sys.modules.pop("torchvision.ops", None)
            importlib.metadata.version = _REAL_VERSION


def _originals() -> dict[tuple[Any, str], Any]:
    from PIL import Image

    saved: dict[tuple[Any, str], Any] = {(Image, "open"): Image.open}
    with contextlib.suppress(ImportError):
        import cv2

        saved.update({(cv2, n): getattr(cv2, n) for n in ("imread", "imwrite", "imshow")})
    with contextlib.suppress(ImportError):
        import torch

        saved[(torch, "save")] = torch.save
    return saved


def _torch_nms(boxes: Any, scores: Any, iou_threshold: float) -> Any:
    """Ultralytics' own NMS in torch (``TorchNMS``), which matches torchvision's."""
    from ultralytics.utils.nms import TorchNMS

    return TorchNMS.nms(boxes, scores, iou_threshold)


def _nms_runs(torchvision: Any) -> bool:
    """Whether torchvision's compiled NMS kernel runs here (PyPI's CUDA build beside
    torch+cpu imports, through models.torchvision_compat, without its ops)."""
    import torch

    try:
        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception:  # RuntimeError: "Couldn't load custom C++ ops", or a missing kernel
        return False
    return True


def _install_torchvision_stand_in() -> None:
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = _torch_nms  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    tv.__version__ = "0.0.0"  # type: ignore[attr-defined]
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.ops"] = ops
    real = _REAL_VERSION

    def version(name: str) -> str:
        if name == "torchvision":
            try:
                return real(name)
            except importlib.metadata.PackageNotFoundError:
                return "0.0.0"
        return real(name)

    importlib.metadata.version = version  # type: ignore[assignment]


def _calibration_batch(photos: Sequence[Path | str], size: int, seed: int) -> Any:
    """Photos letterboxed to ``size`` as Ultralytics feeds them (RGB, 0..1, NCHW), or,
    without photos, seeded synthetic scenes (gradients and rectangles)."""
    import numpy as np
    import torch

    from cvserve.images.preprocess import Preprocessor

    spec = yolo_spec(size, size)
    if photos:
        pre = Preprocessor(spec, decoder="pil")
        x = np.zeros((len(photos), *spec.input_shape), np.float32)
        for i, p in enumerate(photos):
            pre.run(Path(p).read_bytes(), x[i])
        return torch.from_numpy(x)
    rng = np.random.default_rng(seed)
    x = np.empty((8, 3, size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(len(x)):
        a = rng.uniform(0, 1, (3, 3))
        x[i] = a[:, :1, None] * xx + a[:, 1:2, None] * yy + a[:, 2:, None] * 0.3
        for _ in range(6):
            x0, y0 = rng.integers(0, size - 64, 2)
            w, h = rng.integers(32, size // 2, 2)
            x[i, :, y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, (3, 1, 1))
    return torch.from_numpy(np.clip(x, 0, 1))


def _dataset_names(arch: str) -> dict[int, str] | None:
    """COCO's class names (COCO-pose's for a pose model) from the dataset files shipped
    inside ultralytics, so a test model's labels read like a real one's."""
    import yaml
    from ultralytics.utils import ROOT

    name = "coco8-pose.yaml" if "pose" in arch else "coco8.yaml"
    path = Path(ROOT) / "cfg" / "datasets" / name
    if not path.is_file():
        return None
    names = yaml.safe_load(path.read_text()).get("names")
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None


def build(
    arch: str,
    out: Path | str,
    *,
    imgsz: int = 640,
    photos: Sequence[Path | str] = (),
    seed: int = 0,
    batch: int = 1,
    score_bias: float = -5.0,
) -> Path:
    """Export Ultralytics architecture ``arch`` (e.g. ``yolo11n-seg``) with random weights to
    ``out`` (ONNX, Ultralytics' own exporter and metadata). Needs the ``zoo`` extra."""
    import shutil

    import torch
    import yaml

    if arch.endswith(".yaml"):
        arch = arch[: -len(".yaml")]
    out = Path(out)
    with ultralytics_offline(), tempfile.TemporaryDirectory(prefix="cvserve-yolo-") as tmp:
        from ultralytics import YOLO
        from ultralytics.nn.tasks import yaml_model_load

        names = _dataset_names(arch)
        cfg = yaml_model_load(f"{arch}.yaml")
        if names:
            cfg["nc"] = len(names)  # COCO-pose has one class (person), the yaml says 80
        cfg.pop("yaml_file", None)
        cfg.pop("scale", None)
        yaml_path = Path(tmp) / f"{arch}.yaml"  # the name carries the scale (n, s, ...)
        yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        torch.manual_seed(seed)
        model = YOLO(str(yaml_path))
        net = model.model
        x = _calibration_batch(photos, imgsz, seed)
        # Random weights leave every box with the same score in eval mode: one forward pass
        # in train mode (momentum 1: the batch's own statistics) sets BatchNorm's running
        # mean and variance from real activations.
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the passes below
        net.train()
        with torch.no_grad():
            for i in range(0, len(x), 4):
                net(x[i : i + 4])
        net.eval()
        head = net.model[-1]
        with torch.no_grad():
            # Ultralytics starts class biases at log(5 / nc / cells): ~1e-4 scores, nothing
            # passes conf 0.25. Random features around ``score_bias`` give a few dozen boxes
            # of varied labels per photo, so NMS and the labels are exercised.
            for seq in head.cv3:
                seq[-1].bias.fill_(score_bias)
        if names:
            net.names = names
        # Export from a checkpoint-less model: save it as Ultralytics does, then export.
        pt = Path(tmp) / f"{arch}.pt"
        model.save(pt) if hasattr(model, "save") else torch.save({"model": net}, pt)
        exported = YOLO(str(pt)).export(
            format="onnx", imgsz=imgsz, batch=batch, dynamic=False, simplify=False, opset=17
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m cvserve.models.yolo",
        description="Export an Ultralytics YOLO architecture with random weights to ONNX, "
        "offline (needs the zoo extra: ultralytics, torch).",
    )
    p.add_argument("arch", help=f"architecture file name, one of: {', '.join(ARCHS)}")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--imgsz", type=int, default=640, help="input size (default 640)")
    p.add_argument(
        "--photos",
        nargs="*",
        default=(),
        help="photos for BatchNorm calibration (default: synthetic)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--score-bias", type=float, default=-5.0, help="class-logit bias (default -5.0)")
    args = p.parse_args(argv)
    path = build(
        args.arch,
        args.out,
        imgsz=args.imgsz,
        photos=args.photos,
        seed=args.seed,
        score_bias=args.score_bias,
    )
    info = read_export(path)
    assert info is not None
    print(f"{path}: Ultralytics {info.extra['ultralytics_task']} export, {len(info.labels)} labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
