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
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec
from cvserve.models import hf, store, timm_build, torchvision_compat
from cvserve.models.export_check import TOLERANCES, ExportMismatch, check_export
from cvserve.models.hf import labels_from_config, preprocess_spec_from_hf  # noqa: F401
from cvserve.models.metadata import ModelMeta
from cvserve.models.zoo import ZOO, ZooEntry
from cvserve.trace import Say

log = logging.getLogger(__name__)
#: moved to cvserve.models.hf; kept here for callers of the old name
_processor_class = hf.processor_class

ZOO_EXTRA_HINT = "building models needs the zoo extra: pip install 'cvserve[zoo]'"
OPSET = 17
# ONNX Runtime vs torch on the same batch: the task's answers must agree
# (cvserve.models.export_check); beyond that, no output may differ by more than this
# fraction of its largest |value| (a loose bound that float noise on any CPU stays far under).
MAX_EXPORT_REL_ERROR = TOLERANCES.gross


class BuildError(RuntimeError):
    """A model could not be built, exported or verified; the message says why."""


class MissingZooExtra(BuildError):
    """torch / transformers / onnx are not installed."""

    def __init__(self) -> None:
        super().__init__(ZOO_EXTRA_HINT)


def _require_zoo() -> tuple[Any, Any]:
    """Import torch and transformers, or raise MissingZooExtra."""
    torchvision_compat.install()  # before transformers imports a foreign torchvision
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MissingZooExtra() from e
    return torch, transformers


# --- models ---------------------------------------------------------------------------
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
    processor = hf.processor_class(transformers, entry.processor_class)(**entry.processor)
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
    """Export a local ``save_pretrained`` folder (real weights) into the store.

    The task comes from the config's architecture (:func:`cvserve.models.hf.task_of`);
    the folder needs config.json, the weights and preprocessor_config.json. Nothing is
    downloaded (``local_files_only``).
    """
    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file():
        raise BuildError(f"{directory} has no config.json (expected a save_pretrained folder)")
    return _build_hf(
        str(directory), name, cache_dir, progress, f"hf-dir:{directory}", local_files_only=True
    )


def build_from_hub(
    ref: str,
    name: str | None = None,
    cache_dir: Path | str | None = None,
    progress: Say | None = None,
) -> ModelMeta:
    """Build hub model ``org/name[@revision]`` through ``from_pretrained``: the HF cache
    is used (with ``HF_HUB_OFFLINE=1`` only the cache); missing files are one line."""
    repo, revision = hf.split_hub_id(ref)
    name = name or store.default_name("hub", repo)
    source = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    try:
        return _build_hf(repo, name, cache_dir, progress, source, revision=revision)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = hf.hub_cache_hint()
        if offline:
            raise BuildError(
                f"{ref}: not in the HuggingFace cache ({where}) and HF_HUB_OFFLINE is set; "
                "download it once online, or build from a local folder with --from-dir"
            ) from e
        raise BuildError(
            f"{ref}: cannot fetch it from the HuggingFace hub: {_first_line(e)}"
        ) from e


def build_from_timm(
    source: str,
    name: str | None = None,
    cache_dir: Path | str | None = None,
    progress: Say | None = None,
) -> ModelMeta:
    """Build a timm classifier: a model name (random weights) or a checkpoint folder."""
    name = name or store.default_name("timm", source)
    say, t0 = _start(name, source, progress)
    torch, _ = _require_zoo()
    model, tag, weights = timm_build.create(source)
    spec = timm_build.spec_from_timm(timm_build.data_config(model))
    arch = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
    wrapped = timm_build.as_hf_like(torch, model, arch)
    return _export_and_store(
        wrapped,
        spec,
        name=name,
        task="classify",
        source=tag,
        cache=store.cache_dir(cache_dir),
        say=say,
        t0=t0,
        weights=weights,
    )


def _start(name: str, source: str, progress: Say | None) -> tuple[Say, float]:
    """Check the store name, say what is loaded; (say, start time) of a build."""
    store.validate_name(name)
    if name in ZOO:
        raise BuildError(f"{name!r} is a zoo model name; pick another name")
    say = _say(name, progress)
    t0 = time.perf_counter()
    say(f"loading {source}")
    return say, t0


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _build_hf(
    source: str,
    name: str,
    cache_dir: Path | str | None,
    progress: Say | None,
    source_tag: str,
    **kwargs: Any,
) -> ModelMeta:
    say, t0 = _start(name, source, progress)
    torch, transformers = _require_zoo()
    # Never run Python files from the folder (a config's auto_map): transformers would
    # otherwise ask on stdin, and a "y" runs them.
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except ValueError as e:  # unknown model_type, or remote code
        _raise_if_remote_code(source, e)
        raise BuildError(f"{source}: not a model transformers can load: {_first_line(e)}") from e
    hf_task = hf.task_of(config, source)
    folder = Path(source)
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        raise BuildError(
            f"{folder} has no preprocessor_config.json; it defines the model's "
            "preprocessing (save the image processor with save_pretrained next to the model)"
        )
    try:
        model = hf.load_model(transformers, source, hf_task, **kwargs)
        processor = hf.load_image_processor(transformers, source, **kwargs)
    except ValueError as e:
        _raise_if_remote_code(source, e)
        raise BuildError(
            f"{source}: cannot load its {hf_task.architecture}: {_first_line(e)}"
        ) from e
    model = model.float().eval()
    spec = preprocess_spec_from_hf(processor)
    return _export_and_store(
        model,
        spec,
        name=name,
        task=hf_task.task,
        source=source_tag,
        cache=store.cache_dir(cache_dir),
        say=say,
        t0=t0,
        outputs=hf_task.outputs,
        weights="real",
    )


def _raise_if_remote_code(directory: Path | str, error: Exception) -> None:
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
    weights: str = "random",
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
        labels=hf.labels_for(task, model.config),
        params=sum(p.numel() for p in model.parameters()),
        source=source,
        weights=weights,
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
    p.add_argument("--from-hub", help="a HuggingFace hub id, org/name[@revision]")
    p.add_argument("--from-timm", help="a timm model name (random weights) or checkpoint folder")
    p.add_argument("--name", help="store name for --from-* (default: the folder's name)")
    args = p.parse_args(argv)
    if args.model is None and not (args.from_dir or args.from_hub or args.from_timm):
        p.error("give a zoo model name or --from-dir DIR / --from-hub ID / --from-timm NAME")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build one model; one progress line per step on stdout, one-line reason on stderr."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def progress(line: str) -> None:
        print(line, flush=True)

    try:
        own = args.from_dir or args.from_hub or args.from_timm
        if not own:
            _zoo_entry(args.model)  # an unknown name fails before the slow imports
        _quiet_libraries()
        if args.from_dir is not None:
            name = args.name or args.model or store._name_from(Path(args.from_dir).resolve().name)
            build_from_hf_dir(args.from_dir, name, args.cache_dir, progress)
        elif args.from_hub is not None:
            build_from_hub(args.from_hub, args.name, args.cache_dir, progress)
        elif args.from_timm is not None:
            build_from_timm(args.from_timm, args.name, args.cache_dir, progress)
        else:
            build_zoo_model(args.model, args.cache_dir, progress)
    except (BuildError, store.ModelNotFound, ValueError, OSError) as e:  # incl. hf / timm
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
