"""Build ONNX models from HuggingFace: zoo configs (random weights) or a local directory.

Needs the ``zoo`` extra (torch, transformers). Only the build child process
(``python -m cvserve.models.build``) and tests import this module; torch and transformers
are imported inside the functions so that a missing extra becomes a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec
from cvserve.models import store
from cvserve.models.export_check import TOLERANCES, ExportMismatch, check_export
from cvserve.models.metadata import ModelMeta
from cvserve.models.zoo import ZOO, ZooEntry
from cvserve.trace import Say

log = logging.getLogger(__name__)

ZOO_EXTRA_HINT = "building models needs the zoo extra: pip install 'cvserve[zoo]'"
OPSET = 17
# ONNX Runtime vs torch on the same batch: the task's answers must agree
# (cvserve.models.export_check); beyond that, no output may differ by more than this
# fraction of its largest |value| (a loose bound that float noise on any CPU stays far under).
MAX_EXPORT_REL_ERROR = TOLERANCES.gross

# PIL.Image.Resampling values -> PreprocessSpec.interpolation
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_PLACEHOLDER_LABEL = re.compile(r"LABEL_\d+")


class BuildError(RuntimeError):
    """A model could not be built, exported or verified; the message says why."""


class MissingZooExtra(BuildError):
    """torch / transformers / onnx are not installed."""

    def __init__(self) -> None:
        super().__init__(ZOO_EXTRA_HINT)


def _require_zoo() -> tuple[Any, Any]:
    """Import torch and transformers, or raise MissingZooExtra."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingZooExtra() from e
    return torch, transformers


# --- preprocessing --------------------------------------------------------------------
def _interpolation(resample: Any) -> str:
    if resample is None:
        return "bilinear"
    try:
        return _PIL_RESAMPLE[int(resample)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unsupported resample {resample!r}") from None


def _triple(v: Any, default: float) -> tuple[float, float, float]:
    if v is None:
        return (default,) * 3
    if isinstance(v, int | float):
        return (float(v),) * 3
    return tuple(float(x) for x in v)  # type: ignore[return-value]


def _processor_kind(processor: Any, d: dict[str, Any]) -> str:
    kind = d.get("image_processor_type") or type(processor).__name__
    return re.sub(r"(Pil|Fast)$", "", kind)


def preprocess_spec_from_hf(processor: Any) -> PreprocessSpec:
    """Translate a HuggingFace image processor's settings into a PreprocessSpec.

    ConvNextImageProcessor (used by the ResNet checkpoints): below 384 the shortest edge is
    resized to ``int(shortest_edge / crop_pct)`` then center-cropped to a square of
    ``shortest_edge``; at 384 and above the image is warped to a square. Other processors
    (ViT, MobileNetV2, ...): ``size`` height/width is a direct resize, ``size``
    shortest_edge plus ``crop_size`` is resize-then-center-crop.
    """
    d = processor.to_dict()
    kind = _processor_kind(processor, d)
    size = d.get("size") or {}
    if d.get("do_resize") is False:
        raise ValueError(f"{kind} does not resize, so its input size is not fixed")
    crop = d.get("crop_size") if d.get("do_center_crop") else None

    if kind == "ConvNextImageProcessor":
        if crop:
            raise ValueError("ConvNextImageProcessor with do_center_crop is not supported")
        se = size.get("shortest_edge")
        if not se:
            raise ValueError(f"ConvNextImageProcessor needs size.shortest_edge, got {size}")
        crop_pct = d.get("crop_pct") or 224 / 256
        if se < 384:
            geometry = dict(
                height=se,
                width=se,
                resize_mode="shortest_edge_crop",
                resize_shortest=int(se / crop_pct),
            )
        else:
            geometry = dict(height=se, width=se, resize_mode="direct")
    elif "height" in size and "width" in size:
        h, w = int(size["height"]), int(size["width"])
        if d.get("keep_aspect_ratio"):
            # DPT / Depth Anything: the output shape follows each image's aspect ratio.
            raise ValueError(
                f"{kind} with keep_aspect_ratio has no fixed input size; "
                "set keep_aspect_ratio=False for a fixed square"
            )
        if d.get("do_pad") and d.get("size_divisor"):
            raise ValueError(f"{kind} with do_pad and size_divisor has no fixed input size")
        multiple = int(d.get("ensure_multiple_of") or 1)
        if multiple > 1:  # DPT rounds each side to the nearest multiple
            h = max(multiple, round(h / multiple) * multiple)
            w = max(multiple, round(w / multiple) * multiple)
        if crop and (crop.get("height"), crop.get("width")) != (h, w):
            raise ValueError(f"{kind}: resize to {h}x{w} then crop to {crop} is not supported")
        geometry = dict(height=h, width=w, resize_mode="direct")
    elif size.get("shortest_edge") and not size.get("longest_edge"):
        if not crop:
            raise ValueError(
                f"{kind}: shortest-edge resize without a center crop has no fixed size"
            )
        geometry = dict(
            height=int(crop["height"]),
            width=int(crop["width"]),
            resize_mode="shortest_edge_crop",
            resize_shortest=int(size["shortest_edge"]),
        )
    else:
        raise ValueError(f"{kind}: unsupported size {size}")

    normalize = d.get("do_normalize", True)
    return PreprocessSpec(
        **geometry,
        interpolation=_interpolation(d.get("resample")),
        rescale=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
        mean=_triple(d.get("image_mean"), 0.5) if normalize else (0.0, 0.0, 0.0),
        std=_triple(d.get("image_std"), 0.5) if normalize else (1.0, 1.0, 1.0),
        extra={"hf_processor": kind},
    )


def _processor_class(transformers: Any, name: str) -> Any:
    # transformers 5 names the PIL/numpy backend "<Name>Pil" (the plain name wants
    # torchvision); in transformers 4 the plain name is the slow PIL/numpy processor.
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None)
    if cls is None:
        raise BuildError(f"transformers has no image processor {name!r}")
    return cls


def _load_image_processor(transformers: Any, directory: Path) -> Any:
    if not (directory / "preprocessor_config.json").is_file():
        raise BuildError(
            f"{directory} has no preprocessor_config.json; it defines the model's "
            "preprocessing (save the image processor with save_pretrained next to the model)"
        )
    major = int(transformers.__version__.split(".")[0])
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    try:
        return transformers.AutoImageProcessor.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, **kwargs
        )
    except ValueError as e:
        _raise_if_remote_code(directory, e)
        raise


# --- models ---------------------------------------------------------------------------
def labels_from_config(config: Any) -> list[str]:
    """Class names from ``config.id2label``; HF's ``LABEL_i`` placeholders become ``class_i``."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", 0) or len(id2label))
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    if all(_PLACEHOLDER_LABEL.fullmatch(x) for x in names):
        return [f"class_{i}" for i in range(n)]
    return names


def create_zoo_model(name: str, seed: int = 0) -> tuple[Any, Any]:
    """The zoo model ``name`` as (torch model in eval mode, image processor).

    Weights are random but reproducible: the same ``seed`` gives the same weights.
    """
    entry = _zoo_entry(name)
    torch, transformers = _require_zoo()
    config = getattr(transformers, entry.config_class)(**entry.config)
    torch.manual_seed(seed)
    model = getattr(transformers, entry.model_class)(config).eval()
    if entry.break_ties:
        _redraw_constant_weights(torch, model)
    processor = _processor_class(transformers, entry.processor_class)(**entry.processor)
    return model, processor


def _redraw_constant_weights(torch: Any, model: Any, std: float = 0.02) -> None:
    """Give every constant weight matrix (2+ dims, all elements equal) N(0, std) values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.normal_(0.0, std)


def _zoo_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise store.ModelNotFound(name, sorted(ZOO)) from None


def build_zoo_model(
    name: str, cache_dir: Path | str | None = None, progress: Say | None = None
) -> ModelMeta:
    """Create zoo model ``name`` from its config, export it to ONNX, verify, store it."""
    entry = _zoo_entry(name)
    say = _say(name, progress)
    t0 = time.perf_counter()
    say("creating model")
    model, processor = create_zoo_model(name)
    spec = preprocess_spec_from_hf(processor)
    return _export_and_store(
        model,
        spec,
        name=name,
        task=entry.task,
        source=entry.source,
        cache=store.cache_dir(cache_dir),
        say=say,
        t0=t0,
        outputs=entry.outputs,
    )


def build_from_hf_dir(
    directory: Path | str,
    name: str,
    cache_dir: Path | str | None = None,
    progress: Say | None = None,
) -> ModelMeta:
    """Export a local ``save_pretrained`` image classifier (real weights) into the store.

    The directory needs config.json, the weights and preprocessor_config.json; nothing is
    downloaded (``local_files_only``).
    """
    store.validate_name(name)
    if name in ZOO:
        raise BuildError(f"{name!r} is a zoo model name; pick another name")
    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise BuildError(f"{directory} has no config.json (expected a save_pretrained folder)")
    say = _say(name, progress)
    t0 = time.perf_counter()
    torch, transformers = _require_zoo()
    say(f"loading {directory}")
    try:
        # Never run Python files from the folder (a config's auto_map): transformers would
        # otherwise ask on stdin, and a "y" runs them.
        model = transformers.AutoModelForImageClassification.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False
        )
    except ValueError as e:  # unknown / non-classification architecture, or remote code
        _raise_if_remote_code(directory, e)
        raise BuildError(f"{directory}: not an image classifier transformers can load: {e}") from e
    model = model.float().eval()
    spec = preprocess_spec_from_hf(_load_image_processor(transformers, directory))
    return _export_and_store(
        model,
        spec,
        name=name,
        task="classify",
        source=f"hf-dir:{directory}",
        cache=store.cache_dir(cache_dir),
        say=say,
        t0=t0,
    )


def _raise_if_remote_code(directory: Path, error: Exception) -> None:
    """A clear BuildError when loading failed because the folder wants its own code run."""
    if "trust_remote_code" in str(error) or "auto_map" in str(error):
        raise BuildError(
            f"{directory}: the model needs Python code from the folder (an auto_map in its "
            "config); cvserve never runs code from a model folder, so only architectures "
            "that transformers itself ships can be built"
        ) from error


def _say(name: str, progress: Say | None) -> Say:
    def say(step: str) -> None:
        line = f"building {name}: {step}"
        log.info(line)
        if progress is not None:
            progress(line)

    return say


@contextlib.contextmanager
def _temp_path(final: Path) -> Iterator[Path]:
    """A sibling temp path that is removed unless the caller renamed it into place."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _export_and_store(
    model: Any,
    spec: PreprocessSpec,
    *,
    name: str,
    task: str,
    source: str,
    cache: Path,
    say: Say,
    t0: float,
    outputs: tuple[str, ...] = ("logits",),
) -> ModelMeta:
    torch, transformers = _require_zoo()
    import onnxruntime as ort

    wrapper = _outputs_only(torch, model, outputs).eval()
    # How a detector's logits become scores (recorded, so the detect head scores the same).
    score = "sigmoid" if getattr(model.config, "use_focal_loss", False) else "softmax"
    folder = store.model_dir(name, cache)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / store.ONNX_FILE
    sidecar = folder / store.SIDECAR_FILE
    # Unbuilt first: a build that dies halfway must not leave an old sidecar describing a
    # new (or missing) graph.
    sidecar.unlink(missing_ok=True)

    h, w = spec.height, spec.width
    with _temp_path(onnx_path) as tmp:
        say("exporting ONNX")
        gflops = count_gflops(model, (1, 3, h, w))  # part of this step: ~one forward pass
        # Trace at batch 1 and verify at batch 2, so a batch size baked into the graph fails
        # the check instead of the first batched request.
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about every Python branch on a tensor value; the batch-2
            # check below catches the ones that matter.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript exporter is deprecated but ~4x faster here than dynamo for
            # these convnets, and torch is pinned by the zoo extra.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (torch.randn(1, 3, h, w),),
                str(tmp),
                input_names=["pixel_values"],
                output_names=list(outputs),
                dynamic_axes={k: {0: "batch"} for k in ("pixel_values", *outputs)},
                opset_version=OPSET,
                dynamo=False,
            )
        say("verifying")
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            refs = wrapper(x)
        refs = [r.numpy() for r in (refs if isinstance(refs, tuple) else (refs,))]
        gots = session.run(list(outputs), {"pixel_values": x.numpy()})
        try:
            checked = check_export(
                task,
                outputs,
                refs,
                gots,
                score=score,
                input_hw=(h, w),
                tol=dataclasses.replace(TOLERANCES, gross=MAX_EXPORT_REL_ERROR),
            )
        except ExportMismatch as e:
            raise BuildError(f"exported ONNX disagrees with torch: {e}") from None
        inp = session.get_inputs()[0]
        input_shape = [d if isinstance(d, int) else None for d in inp.shape]
        output_names = [o.name for o in session.get_outputs()]
        del session
        os.replace(tmp, onnx_path)

    seconds = time.perf_counter() - t0
    meta = ModelMeta(
        name=name,
        task=task,
        onnx_file=store.ONNX_FILE,
        input_name=inp.name,
        input_shape=input_shape,
        input_dtype="float32",
        output_names=output_names,
        preprocess=spec,
        labels=labels_from_config(model.config),
        params=sum(p.numel() for p in model.parameters()),
        source=source,
        extra={
            "gflops": gflops,
            "flops_convention": "FLOPs = 2 x multiply-accumulates, batch 1",
            "export_check_max_abs": checked.pop("max_abs"),
            "export_check_rel": checked.pop("rel"),
            "export_check": checked,
            **({"score": score} if task == "detect" else {}),
            "architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", ""),
            "opset": OPSET,
            "exporter": "torch.onnx (torchscript)",
            "build_seconds": round(seconds, 2),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    )
    store.write_meta(meta, cache)
    say(f"done in {seconds:.1f} s")
    return meta


def count_gflops(model: Any, input_shape: tuple[int, ...]) -> float:
    """GFLOPs of one forward pass on a zero input of ``input_shape`` (batch 1 normally).

    torch's FlopCounterMode counts matmuls, convolutions (and transposed ones) and
    attention as 2 FLOPs per multiply-accumulate; elementwise ops, norms and resizes are
    not counted. So ResNet-50 at 224x224 is ~8.2 GFLOPs (the "4.1 GFLOPs" of papers is
    multiply-accumulates).
    """
    torch, _ = _require_zoo()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(pixel_values=torch.zeros(*input_shape))
    return float(f"{counter.get_total_flops() / 1e9:.4g}")


def _outputs_only(torch: Any, model: Any, outputs: tuple[str, ...] = ("logits",)) -> Any:
    """Wrap an HF model so the traced graph's outputs are exactly ``outputs`` (attributes
    of its output object): the logits of a classifier, logits and boxes of a detector."""

    class OutputsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            out = self.inner(pixel_values=pixel_values, return_dict=True)
            if len(outputs) == 1:
                return getattr(out, outputs[0])
            return tuple(getattr(out, k) for k in outputs)

    return OutputsOnly(model)


# --- child-process entry point --------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cvserve.models.build",
        description="Build a zoo model (or a local HF folder) into the cvserve model store.",
    )
    p.add_argument("model", nargs="?", help=f"zoo model: {', '.join(sorted(ZOO))}")
    p.add_argument("--cache-dir", help="store root (default: $CVSERVE_CACHE or ~/.cache/cvserve)")
    p.add_argument("--from-dir", help="a local save_pretrained folder with real weights")
    p.add_argument("--name", help="store name for --from-dir (default: the folder's name)")
    args = p.parse_args(argv)
    if args.from_dir is None and args.model is None:
        p.error("give a zoo model name or --from-dir DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build one model; one progress line per step on stdout, one-line reason on stderr."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        if args.from_dir is None:
            _zoo_entry(args.model)  # an unknown name fails before the slow imports
        _quiet_libraries()
        if args.from_dir is not None:
            name = args.name or args.model or store._name_from(Path(args.from_dir).resolve().name)
            build_from_hf_dir(args.from_dir, name, args.cache_dir, progress)
        else:
            build_zoo_model(args.model, args.cache_dir, progress)
    except (BuildError, store.ModelNotFound, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # e.g. onnx, which the exporter imports on its own
        print(f"error: {ZOO_EXTRA_HINT} ({e})", file=sys.stderr)
        return 1
    except Exception as e:  # unexpected: keep the traceback, end with the one-line reason
        import traceback

        traceback.print_exc()
        print(f"error: building failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


def _quiet_libraries() -> None:
    """Keep the child's stderr to what matters: the reason if it fails."""
    _, transformers = _require_zoo()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
