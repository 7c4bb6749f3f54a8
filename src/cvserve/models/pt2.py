"""Models as ``torch.export`` programs (``.pt2``): export, verify, add, find.

A model folder of the store may hold ``model.pt2`` beside ``model.onnx``; the sidecar's
``extra["pt2"]`` says so (file, how it was checked, the torch that wrote it). Rebuilding
the ONNX file writes a new sidecar without it, so a stale program is never served.

* :func:`export_program` exports a module with a dynamic batch dimension (falling back to
  the example's batch size where the model will not trace with one);
* :func:`verify_program` runs program and eager module on the same batches (sizes 1 and 3,
  so a baked-in batch size fails) and checks the task's answer
  (:func:`cvserve.models.export_check.check_export`), with a tight numeric bound;
* :func:`build_pt2` recreates a built zoo or HF-folder model's eager module, writes its
  program, verifies it against the eager model and the stored ONNX file, and records it;
  ``python -m cvserve.models.pt2 NAME`` is its child-process entry (:func:`ensure_pt2`);
* :func:`add_pt2` stores a user's ``.pt2`` (``cvserve models add model.pt2``);
* :func:`graph_path` is the file a runtime serves.

torch is imported only inside the functions that need it: serving an ONNX model never
imports it, and this module is safe to import without the ``torch`` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.images.spec import PreprocessSpec
from cvserve.models import store
from cvserve.models.export_check import TOLERANCES, ExportMismatch, check_export
from cvserve.models.metadata import ModelMeta
from cvserve.models.zoo import ZOO
from cvserve.trace import Say

log = logging.getLogger(__name__)

__all__ = [
    "PT2_FILE",
    "add_pt2",
    "build_pt2",
    "ensure_pt2",
    "export_program",
    "graph_path",
    "verify_program",
]

PT2_FILE = "model.pt2"
#: The largest batch a dynamic program is exported for (the batcher never forms more).
MAX_BATCH = 4096
#: Program vs eager module: the same aten ops, so far closer than ONNX's bound.
MAX_PT2_REL_ERROR = 1e-3
TORCH_HINT = "the .pt2 path needs PyTorch: pip install 'cvserve[torch]'"


class Pt2Error(ValueError):
    """A program could not be exported, verified, loaded or found; the message says why."""


# --- which file a runtime serves ---------------------------------------------------------
def graph_path(meta: ModelMeta, folder: Path | str, runtime: str) -> Path:
    """The file ``runtime`` serves for ``meta`` (stored in ``folder``): the ``.pt2`` for
    ``torch``, the ONNX file otherwise; a one-line :class:`Pt2Error` when it has none."""
    folder = Path(folder)
    info = (meta.extra or {}).get("pt2") or {}
    if runtime == "torch":
        name = info.get("file")
        if not name or not (folder / name).is_file():
            raise Pt2Error(
                f"model {meta.name!r} has no torch.export program: cvserve models build "
                f"{meta.name} --pt2 (zoo and HF-folder models), or cvserve models add FILE.pt2"
            )
        return folder / name
    if meta.onnx_file.endswith(".pt2"):
        raise Pt2Error(
            f"model {meta.name!r} is a torch.export program (.pt2) only: serve it with "
            "--runtime torch"
        )
    return folder / meta.onnx_file


# --- export and verification ---------------------------------------------------------------
def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise Pt2Error(f"{TORCH_HINT} ({e})") from None
    return torch


def export_program(module: Any, example: Any, input_name: str = "pixel_values") -> tuple[Any, bool]:
    """``(ExportedProgram, dynamic)`` of ``module`` called as ``module(example)``: its
    batch dimension dynamic (1..MAX_BATCH) where it traces so, else fixed at batch 1 (the
    runtime then runs a batch image by image: RT-DETR's HF code specialises on its batch
    size, for one)."""
    torch = _torch()
    module = module.eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        try:
            ep = torch.export.export(module, (example,), dynamic_shapes={input_name: {0: batch}})
            return ep, True
        except Exception as e:  # a model that specialises on its batch size
            log.warning("dynamic-batch export failed (%s); exporting batch 1", str(e)[:300])
            return torch.export.export(module, (example[:1],)), False


def verify_program(
    ep: Any,
    module: Any,
    task: str,
    outputs: tuple[str, ...] | list[str],
    input_shape: tuple[int, ...],
    *,
    score: str = "softmax",
    dynamic: bool = True,
) -> dict[str, Any]:
    """Run ``ep`` and the eager ``module`` on the same random batches (sizes 1 and 3 when
    the program's batch is dynamic) and check the task's answer agrees, no output off by
    more than ``MAX_PT2_REL_ERROR`` of its largest value. Returns what was measured."""
    torch = _torch()
    prog = ep.module()
    sizes = (1, 3) if dynamic else (int(input_shape[0]),)
    worst: dict[str, Any] = {}
    for n in sizes:
        x = torch.randn(n, *input_shape[1:], generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            refs = [r.float().numpy() for r in _as_list(module(x))]
            gots = [g.float().numpy() for g in _as_list(prog(x))]
        try:
            checked = check_export(
                task, list(outputs)[: len(refs)] if len(outputs) >= len(refs) else
                [f"output{i}" for i in range(len(refs))], refs, gots, score=score,
                input_hw=tuple(input_shape[2:4]),
                tol=dataclasses.replace(TOLERANCES, gross=MAX_PT2_REL_ERROR),
            )  # fmt: skip
        except ExportMismatch as e:
            raise Pt2Error(
                f"the torch.export program disagrees with the eager model: {e}"
            ) from None
        if not worst or checked["rel"] >= worst["rel"]:
            worst = {**checked, "batch_sizes": list(sizes)}
    return worst


def _as_list(out: Any) -> list[Any]:
    if isinstance(out, list | tuple):
        return list(out)
    return [out]


def save_program(ep: Any, path: Path) -> None:
    """``torch.export.save`` to ``path`` atomically (a sibling temp file, then rename)."""
    torch = _torch()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.export.save(ep, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- zoo and HF-folder models ------------------------------------------------------------
def eager_module(meta: ModelMeta) -> tuple[Any, tuple[str, ...], str]:
    """``(module, output names, detector score)`` of a built zoo or HF-folder model,
    recreated as its build made it (zoo weights are seeded; a folder is reloaded)."""
    from cvserve.models import build

    torch, transformers = build._require_zoo()
    source = meta.source or ""
    if meta.name in ZOO and source.startswith("zoo"):
        model, _ = build.create_zoo_model(meta.name)
        outputs = ZOO[meta.name].outputs
    elif source.startswith("hf-dir:"):
        model = transformers.AutoModelForImageClassification.from_pretrained(
            source.removeprefix("hf-dir:"), local_files_only=True, trust_remote_code=False
        ).float().eval()  # fmt: skip
        outputs = ("logits",)
    else:
        raise Pt2Error(
            f"model {meta.name!r} ({source or 'unknown source'}): only zoo and HF-folder "
            "models are rebuilt as .pt2; export your own with torch.export and "
            "`cvserve models add FILE.pt2`"
        )
    score = "sigmoid" if getattr(model.config, "use_focal_loss", False) else "softmax"
    return build._outputs_only(torch, model, tuple(outputs)).eval(), tuple(outputs), score


def build_pt2(name: str, cache: Path | str | None = None, progress: Say | None = None) -> ModelMeta:
    """Write ``model.pt2`` beside built model ``name``'s ONNX file, verified against the
    eager model and against the ONNX file (the same task check), and record it."""
    torch = _torch()
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    meta = store.load_meta(name, cache)
    folder = store.model_dir(name, cache)
    say(f"building {name}: recreating the eager model")
    module, outputs, score = eager_module(meta)
    spec = meta.preprocess
    shape = (2, *spec.input_shape)
    say(f"building {name}: torch.export (dynamic batch)")
    ep, dynamic = export_program(module, torch.randn(*shape))
    say(f"building {name}: verifying against the eager model")
    if not dynamic:
        say(f"building {name}: the model fixes its batch size; the program takes batch 1")
        shape = (1, *shape[1:])
    checked = verify_program(ep, module, meta.task, outputs, shape, score=score, dynamic=dynamic)
    agree = _against_onnx(ep, meta, folder, outputs, shape, score)
    save_program(ep, folder / PT2_FILE)

    meta.extra = {**(meta.extra or {}), "pt2": {
        "file": PT2_FILE, "dynamic_batch": dynamic, "torch": torch.__version__,
        "check_eager": {k: checked[k] for k in ("max_abs", "rel") if k in checked},
        "check_onnx": agree, "build_seconds": round(time.perf_counter() - t0, 2),
    }}  # fmt: skip
    store.write_meta(meta, cache)
    say(f"building {name}: wrote {folder / PT2_FILE}")
    return meta


def _against_onnx(ep, meta, folder, outputs, shape, score) -> dict[str, Any]:  # noqa: ANN001
    """The program's answers against the stored ONNX file's on one batch (task check)."""
    import onnxruntime as ort

    torch = _torch()
    onnx = folder / meta.onnx_file
    if not onnx.is_file() or meta.onnx_file.endswith(".pt2"):
        return {}
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        gots = [g.float().numpy() for g in _as_list(ep.module()(x))]
    refs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    try:
        checked = check_export(meta.task, list(outputs), gots, refs, score=score,
                               input_hw=tuple(shape[2:4]))  # fmt: skip
    except ExportMismatch as e:
        raise Pt2Error(f"the torch.export program disagrees with the ONNX file: {e}") from None
    return {k: checked[k] for k in ("max_abs", "rel") if k in checked}


def ensure_pt2(name: str, cache: Path | str | None = None, progress: Say | None = None,
               *, timeout: float | None = None, force: bool = False) -> ModelMeta:  # fmt: skip
    """Build model ``name`` (if needed) and its ``.pt2`` (if not recorded yet, or
    ``force``) in child processes, so the caller never imports torch; returns the sidecar
    that records it."""
    meta = store.ensure_built(name, cache, progress=progress, timeout=timeout, force=force)
    if not force:
        try:
            graph_path(meta, store.model_dir(meta.name, cache), "torch")
            return meta
        except Pt2Error:
            pass
    store.build_child([meta.name], meta.name, progress, cache=cache, timeout=timeout,
                      module="cvserve.models.pt2")  # fmt: skip
    return store.load_meta(meta.name, cache)


# --- a user's .pt2 --------------------------------------------------------------------------
def inspect_pt2(path: Path, spec: PreprocessSpec, task: str, labels: list[str] | None) -> dict:
    """The input/output facts of a user's program, checked like an ONNX file's."""
    torch = _torch()
    from cvserve.runtime.torchrt import program_signature

    try:
        ep = torch.export.load(str(path))
    except Exception as e:
        raise store.InvalidModel(
            f"{path}: torch cannot load it as a torch.export program: {e}"
        ) from e
    inputs, outputs = program_signature(ep)
    if len(inputs) != 1:
        raise store.InvalidModel(f"{path}: needs exactly one image input, has {len(inputs)}")
    name, shape, dtype = inputs[0]
    if dtype not in ("float32", "uint8"):
        raise store.InvalidModel(
            f"{path}: input {name!r} is {dtype}; an image input is float32 or uint8"
        )
    if dtype != spec.dtype:
        raise store.InvalidModel(
            f"{path}: input {name!r} is {dtype} but the preprocessing spec sends {spec.dtype}"
        )
    if len(shape) != 4:
        raise store.InvalidModel(
            f"{path}: input {name!r} has shape {shape}; an image batch has rank 4"
        )
    for axis, (got, want) in enumerate(zip(shape[1:], spec.input_shape, strict=True), 1):
        if got is not None and got != want:
            raise store.InvalidModel(
                f"{path}: input {name!r} has shape {shape} but the preprocessing spec makes "
                f"{spec.layout} {list(spec.input_shape)} (axis {axis}: {got} != {want})"
            )
    if task == "classify" and labels and outputs and outputs[0][1]:
        last = outputs[0][1][-1]
        if isinstance(last, int) and last != len(labels):
            raise store.InvalidModel(f"{path}: output has {last} classes but {len(labels)} labels")
    return {"input_name": name, "input_shape": shape, "input_dtype": dtype,
            "output_names": [o[0] for o in outputs], "dynamic_batch": shape[0] is None}  # fmt: skip


def add_pt2(
    path: Path | str,
    name: str | None = None,
    task: str | None = None,
    spec: PreprocessSpec | None = None,
    labels: list[str] | None = None,
    cache: Path | str | None = None,
    *,
    overwrite: bool = False,
    version: int | None = None,
    outputs: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelMeta:
    """Register a user's ``.pt2`` (``torch.export.save``): checked like an ONNX file (one
    rank-4 image input agreeing with ``spec``), copied in (as ``version`` of ``name``, as
    :func:`cvserve.models.store.add_model`), described by a sidecar. Served with
    ``--runtime torch``. ``outputs`` (an output mapping) is for ONNX files only."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"no such .pt2 file: {src}")
    name = store.user_model_name(src, name)
    if outputs:
        raise store.InvalidModel(f"{src}: --output maps an ONNX file's outputs, not a .pt2's")
    task = task or "classify"
    spec = spec or PreprocessSpec(height=224, width=224, resize_shortest=256)
    info = inspect_pt2(src, spec, task, labels)
    dynamic = info.pop("dynamic_batch")
    with store.new_version_folder(name, version, cache, overwrite) as folder:
        (folder / store.ONNX_FILE).unlink(missing_ok=True)
        tmp = folder / f".{PT2_FILE}.tmp-{os.getpid()}"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, folder / PT2_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        meta = ModelMeta(
            name=name, task=task, onnx_file=PT2_FILE, preprocess=spec,
            labels=list(labels or []), source=f"user:{src}", weights="unknown",
            extra={**(extra or {}), "pt2": {"file": PT2_FILE, "dynamic_batch": dynamic}}, **info,
        )  # fmt: skip
        store._write_meta_in(meta, folder)
    return meta


def sample_outputs(meta: ModelMeta, folder: Path, batch: np.ndarray) -> list[np.ndarray]:
    """The program's outputs on ``batch`` (for tests and checks)."""
    torch = _torch()
    ep = torch.export.load(str(graph_path(meta, folder, "torch")))
    with torch.no_grad():
        return [o.float().numpy() for o in _as_list(ep.module()(torch.from_numpy(batch)))]


# --- child-process entry point -----------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m cvserve.models.pt2 NAME``: one progress line per step on stdout, the
    one-line reason on stderr."""
    p = argparse.ArgumentParser(prog="python -m cvserve.models.pt2",
                                description="Write a built model's torch.export program.")  # fmt: skip
    p.add_argument("model")
    p.add_argument("--cache-dir")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from cvserve.models.build import _quiet_libraries

        _quiet_libraries()
        build_pt2(args.model, args.cache_dir, lambda line: print(line, flush=True))
    except (Pt2Error, store.ModelNotFound, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # unexpected: keep the traceback, end with the one-line reason
        import traceback

        traceback.print_exc()
        print(f"error: exporting failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
