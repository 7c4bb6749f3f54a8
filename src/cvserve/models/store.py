"""The model store: ONNX files with their ModelMeta sidecars under one cache folder.

Layout: ``<cache>/models/<name>/model.onnx`` and ``<cache>/models/<name>/model.json``; a
model is built when both exist (the sidecar is written last). Zoo models are built in a
child process (``python -m cvserve.models.build``) so that this module, and the serving
path that uses it, never imports torch or transformers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cvserve.models.outputs as output_roles
from cvserve.images.spec import PreprocessSpec
from cvserve.models.errors import InvalidModel, ModelBuildError, ModelNotBuilt, ModelNotFound
from cvserve.models.external_data import (
    DATA_FILE,
    UnsafeExternalData,
    external_files,
    save_self_contained,
)
from cvserve.models.metadata import ModelMeta
from cvserve.models.zoo import ZOO
from cvserve.trace import Say

log = logging.getLogger(__name__)

CACHE_ENV = "CVSERVE_CACHE"
ONNX_FILE = "model.onnx"
SIDECAR_FILE = "model.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class ModelEntry:
    """One row of ``cvserve models list``."""

    name: str
    task: str
    built: bool
    source: str
    path: Path | None  # the ONNX file when built
    #: "real", "random" or "unknown" (ModelMeta.weights); zoo models are random
    weights: str = "unknown"


# --- layout ---------------------------------------------------------------------------
def cache_dir(override: Path | str | None = None) -> Path:
    """The store root: ``override``, else ``$CVSERVE_CACHE``, else ``~/.cache/cvserve``."""
    if override is not None and str(override) != "":
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cvserve"


def validate_name(name: str) -> str:
    """Model names become folder names: letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit)"
        )
    return name


def _models_root(cache: Path | str | None) -> Path:
    return cache_dir(cache) / "models"


def model_dir(name: str, cache: Path | str | None = None) -> Path:
    """The folder of model ``name`` (which may not exist yet)."""
    return _models_root(cache) / validate_name(name)


def model_path(meta: ModelMeta, cache: Path | str | None = None) -> Path:
    """The ONNX file that ``meta`` describes."""
    return model_dir(meta.name, cache) / meta.onnx_file


def _read_built(name: str, cache: Path | str | None) -> ModelMeta | None:
    return _read_built_in(model_dir(name, cache))


def _read_built_in(folder: Path) -> ModelMeta | None:
    sidecar = folder / SIDECAR_FILE
    if not sidecar.is_file():
        return None
    try:
        meta = ModelMeta.load(sidecar)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable sidecar %s: %s", sidecar, e)
        return None
    if not (folder / meta.onnx_file).is_file():
        return None
    return meta


def write_meta(meta: ModelMeta, cache: Path | str | None = None) -> Path:
    """Write the sidecar of ``meta`` atomically; returns its path."""
    return _write_meta_in(meta, model_dir(meta.name, cache))


def _write_meta_in(meta: ModelMeta, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SIDECAR_FILE
    tmp = folder / f".{SIDECAR_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(meta.to_dict(), indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def _store_lock(cache: Path | str | None) -> Iterator[None]:
    """Serialize builds and adds across processes sharing one store."""
    root = _models_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- queries --------------------------------------------------------------------------
def _stored_names(cache: Path | str | None) -> list[str]:
    root = _models_root(cache)
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name) is not None
    )


def list_models(cache: Path | str | None = None) -> list[ModelEntry]:
    """Every zoo model (built or not), then every other model in the store, by name."""
    entries = []
    for name in sorted(ZOO):
        meta = _read_built(name, cache)
        entries.append(
            ModelEntry(
                name=name,
                task=ZOO[name].task,
                built=meta is not None,
                source=meta.source if meta else ZOO[name].source,
                path=model_path(meta, cache) if meta else None,
                weights=meta.weights if meta else "random",
            )
        )
    for name in _stored_names(cache):
        if name in ZOO:
            continue
        meta = _read_built(name, cache)
        if meta is not None:
            entries.append(
                ModelEntry(
                    name, meta.task, True, meta.source, model_path(meta, cache), meta.weights
                )
            )
    return entries


def available_names(cache: Path | str | None = None) -> list[str]:
    """Zoo names plus stored model names."""
    return sorted({e.name for e in list_models(cache)})


def load_meta(name: str, cache: Path | str | None = None) -> ModelMeta:
    """The sidecar of a built model; ModelNotBuilt for an unbuilt zoo model."""
    try:
        validate_name(name)
    except ValueError:
        raise ModelNotFound(name, available_names(cache)) from None
    meta = _read_built(name, cache)
    if meta is not None:
        return meta
    if name in ZOO:
        raise ModelNotBuilt(name)
    raise ModelNotFound(name, available_names(cache))


def describe(meta: ModelMeta, cache: Path | str | None = None) -> dict[str, Any]:
    """Everything in the sidecar plus where the ONNX file is and its size (``models show``)."""
    d = meta.to_dict()
    path = model_path(meta, cache)
    d["path"] = str(path)
    d["file_size"] = path.stat().st_size if path.is_file() else None
    d["num_labels"] = len(meta.labels)
    # GFLOPs per image (2 x MACs, batch 1), counted at build time; None for models built
    # before it was recorded.
    d["gflops"] = (meta.extra or {}).get("gflops")
    return d


# --- building -------------------------------------------------------------------------
def ensure_built(
    name: str,
    cache: Path | str | None = None,
    progress: Say | None = None,
    *,
    force: bool = False,
    timeout: float | None = None,
) -> ModelMeta:
    """The meta of model ``name``, building it first if it is an unbuilt zoo model.

    The build runs in a child process (``python -m cvserve.models.build``), each of its
    stdout lines goes to ``progress``. ``force`` rebuilds a zoo model that is built.
    Raises ModelNotFound for unknown names and ModelBuildError if the child fails.
    """
    if not force:
        try:
            return load_meta(name, cache)
        except ModelNotBuilt:
            pass
    if name not in ZOO:
        return load_meta(name, cache)  # a stored model, or ModelNotFound
    root = cache_dir(cache)
    with _store_lock(root):
        if not force:
            meta = _read_built(name, root)
            if meta is not None:  # another process built it while we waited for the lock
                return meta
        _run_build_child([name, "--cache-dir", str(root)], name, progress, timeout)
    meta = _read_built(name, root)
    if meta is None:
        raise ModelBuildError(name, 0, "error: the build finished but left no model behind")
    return meta


def build_from_dir(
    directory: Path | str,
    name: str | None = None,
    cache: Path | str | None = None,
    progress: Say | None = None,
    *,
    timeout: float | None = None,
) -> ModelMeta:
    """Build a local HuggingFace ``save_pretrained`` folder (real weights) into the store.

    Runs ``python -m cvserve.models.build --from-dir`` in a child process, like
    ensure_built; ``name`` defaults to the folder's name. Rebuilds if it exists. The task
    (classify, segment, detect, depth, embed) comes from the folder's config.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"no such folder: {directory}")
    name = name or _name_from(directory.name)
    return build_from("dir", str(directory), name, cache, progress, timeout=timeout)


def build_from(
    kind: str,
    ref: str,
    name: str,
    cache: Path | str | None = None,
    progress: Say | None = None,
    *,
    timeout: float | None = None,
) -> ModelMeta:
    """Build ``ref`` into the store as ``name`` in a child process: ``kind`` ``dir`` (a
    HF folder), ``hub`` (a HF hub id ``org/name[@revision]``) or ``timm`` (a timm model
    name or checkpoint folder)."""
    if kind not in ("dir", "hub", "timm"):
        raise ValueError(f"unknown model source kind {kind!r}")
    name = validate_name(name)
    if name in ZOO:
        raise ValueError(f"{name!r} is a zoo model name; pick another name")
    build_child(
        [f"--from-{kind}", ref, "--name", name], name, progress, cache=cache, timeout=timeout
    )
    meta = _read_built(name, cache)
    if meta is None:
        raise ModelBuildError(name, 0, "error: the build finished but left no model behind")
    return meta


def default_name(kind: str, ref: str) -> str:
    """The store name of ``ref`` when none is given: folder name, hub repo or timm name."""
    if kind == "hub":
        return _name_from(ref.partition("@")[0].rsplit("/", 1)[-1])
    path = Path(ref).expanduser()
    return _name_from(path.resolve().name if path.is_dir() else ref)


def build_child(
    args: list[str],
    label: str,
    progress: Say | None = None,
    *,
    cache: Path | str | None = None,
    timeout: float | None = None,
    module: str = "cvserve.models.build",
) -> None:
    """Run ``python -m MODULE ARGS --cache-dir CACHE`` under the store lock (``module``:
    the ONNX build, or ``cvserve.models.pt2``).

    Each stdout line goes to ``progress``; ModelBuildError (named ``label``) on failure.
    """
    root = cache_dir(cache)
    with _store_lock(root):
        _run_build_child([*args, "--cache-dir", str(root)], label, progress, timeout, module)


def _name_from(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", stem).strip(".-_")


def _run_build_child(
    args: list[str], name: str, progress: Say | None, timeout: float | None,
    module: str = "cvserve.models.build",
) -> None:  # fmt: skip
    cmd = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.debug("running %s", cmd)
    # stderr goes to a file: reading two pipes from one thread can deadlock.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, bufsize=1
        )
        # The timer kills a hung child, which closes its stdout and ends the read loop.
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout is not None else None
        try:
            if timer is not None:
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line and progress is not None:
                    progress(line)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if rc != 0:
            err.seek(0)
            tail = "".join(deque(err, maxlen=20))
            if fired.is_set():
                tail += f"error: timed out after {timeout:g} s\n"
            raise ModelBuildError(name, rc, tail)


# --- user models ----------------------------------------------------------------------
def add_model(
    onnx_path: Path | str,
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
    """Register a user's ONNX file: validate it with onnxruntime, copy it in, write a sidecar.

    ``version``: store it as that version of ``name`` (:func:`version_dir`; None or 1: the
    model's own folder, version 1).

    An Ultralytics YOLO export is recognised by its metadata (:mod:`cvserve.models.yolo`):
    its task, labels and letterbox preprocessing come from the file unless given. Any other
    file with ``task`` None is a classifier.

    The model needs exactly one image input of rank 4 (``spec.layout``, 3 channels) whose
    fixed dimensions agree with ``spec``; ``spec`` defaults to 224x224 ImageNet
    preprocessing. ``outputs`` maps the task's output roles to graph outputs
    (:mod:`cvserve.models.outputs`); the stored graph keeps just those, in role order.
    Raises InvalidModel with the reason otherwise.
    """
    src = Path(onnx_path).expanduser().resolve()
    if not src.is_file():
        raise FileNotFoundError(f"no such ONNX file: {src}")
    name = user_model_name(src, name)
    from cvserve.models.yolo import read_export as read_yolo_export

    yolo_extra: dict[str, Any] = {}
    try:
        yolo = read_yolo_export(src)
    except ValueError as e:
        raise InvalidModel(str(e)) from None
    if yolo is not None and task in (None, yolo.task):
        task, spec, labels = yolo.task, spec or yolo.spec, labels or yolo.labels
        yolo_extra = yolo.extra
    task = task or "classify"
    spec = spec or PreprocessSpec(height=224, width=224, resize_shortest=256)
    external = _external_data(src)  # checked before onnxruntime follows any of it
    info = output_roles.inspect_user_onnx(src, spec, task, labels, outputs)
    keep = info.pop("keep_outputs", None)

    with new_version_folder(name, version, cache, overwrite) as folder:
        tmp = folder / f".{ONNX_FILE}.tmp-{os.getpid()}"
        try:
            if external:  # weights beside the file: bring them in (the store keeps one file)
                save_self_contained(src, tmp)
            else:
                shutil.copyfile(src, tmp)
                (folder / DATA_FILE).unlink(missing_ok=True)
            if keep is not None:
                output_roles.keep_only(tmp, keep)
            os.replace(tmp, folder / ONNX_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        meta = ModelMeta(
            name=name,
            task=task,
            onnx_file=ONNX_FILE,
            preprocess=spec,
            labels=list(labels or []),
            source=f"user:{src}",
            weights="unknown",
            extra={**yolo_extra, **(extra or {})},
            **info,
        )
        _write_meta_in(meta, folder)
    return meta


def user_model_name(src: Path, name: str | None) -> str:
    """The store name of a user's file ``src``: ``name``, else its stem; never a zoo name."""
    name = validate_name(name or _name_from(src.stem))
    if name in ZOO:
        raise ValueError(f"{name!r} is a zoo model name; pick another name")
    return name


@contextmanager
def new_version_folder(
    name: str, version: int | None, cache: Path | str | None, overwrite: bool
) -> Iterator[Path]:
    """Under the store's lock, the folder of ``version`` (None: 1) of ``name`` for a new
    file: refused when that version is built unless ``overwrite``, its sidecar removed (the
    version is not built until the caller writes the new one)."""
    with _store_lock(cache):
        folder = version_dir(name, version or 1, cache)
        if _read_built_in(folder) is not None and not overwrite:
            what = f"model {name!r}" + (f" version {version}" if version else "")
            raise FileExistsError(
                f"{what} already exists; replace it with --force (overwrite=True)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SIDECAR_FILE).unlink(missing_ok=True)
        yield folder


def fold_normalize(
    name: str,
    new_name: str | None = None,
    cache: Path | str | None = None,
    *,
    overwrite: bool = False,
) -> ModelMeta:
    """Store a copy of model ``name`` that takes uint8 pixels and normalizes in its graph.

    The copy is named ``new_name`` (default ``<name>-u8``); its preprocessing is the
    original's with ``dtype='uint8'``. Needs the ``onnx`` package.
    """
    import onnx

    from cvserve.models.fold import fold_normalize as fold_graph

    meta = load_meta(name, cache)
    new_name = validate_name(new_name or f"{name}-u8")
    if new_name in ZOO:
        raise ValueError(f"{new_name!r} is a zoo model name; pick another name")
    if meta.input_dtype != "float32":
        raise InvalidModel(f"model {name!r} takes {meta.input_dtype}; only float32 inputs fold")
    folded = fold_graph(onnx.load(str(model_path(meta, cache))), meta.preprocess)
    with _store_lock(cache):
        if _read_built(new_name, cache) is not None and not overwrite:
            raise FileExistsError(
                f"model {new_name!r} already exists; replace it with --force (overwrite=True)"
            )
        folder = model_dir(new_name, cache)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SIDECAR_FILE).unlink(missing_ok=True)
        tmp = folder / f".{ONNX_FILE}.tmp-{os.getpid()}"
        try:
            onnx.save(folded, str(tmp))
            os.replace(tmp, folder / ONNX_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        new = ModelMeta.from_dict(meta.to_dict())
        new.name = new_name
        new.onnx_file = ONNX_FILE
        new.input_dtype = "uint8"
        new.preprocess = meta.preprocess.replace(dtype="uint8")
        new.source = f"fold:{name}"
        new.extra = {**meta.extra, "folded_from": name}
        write_meta(new, cache)
    return new


def _external_data(src: Path) -> list[Path]:
    """The external-data files of ``src``, checked to lie inside its folder; [] when it has
    none or onnx cannot parse it (then onnxruntime says why)."""
    import onnx

    try:
        proto = onnx.load(str(src), load_external_data=False)
    except Exception:  # not protobuf: inspect_user_onnx reports onnxruntime's reason
        return []
    try:
        return external_files(proto, src.parent)
    except UnsafeExternalData as e:
        raise InvalidModel(f"{src}: {e}") from None


# --- versions (the rest: cvserve.models.versions) ---------------------------------------


def version_dir(name: str, version: int, cache: Path | str | None = None) -> Path:
    """The folder of version ``version`` (>= 1) of model ``name`` (which may not exist)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"a model version is an integer >= 1, not {version!r}")
    folder = model_dir(name, cache)
    return folder if version == 1 else folder / str(version)
