"""Loading what a server serves: every configured model (each version its policy names)
and pipeline, built if needed, and the state of a server that has loaded nothing yet.
:func:`open_model` is the one way a model version is opened, at start-up and while the
server runs (:mod:`cvserve.serving.control`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cvserve.config import ModelConfig, ServerConfig, available_memory, select_versions
from cvserve.images.budget import PixelBudget
from cvserve.models import store, versions
from cvserve.models.metadata import ModelMeta
from cvserve.serving import logs
from cvserve.serving.core import PreprocessPool
from cvserve.serving.errors import ModelTooLarge
from cvserve.serving.metrics import Metrics
from cvserve.serving.model import ModelServer
from cvserve.serving.state import ServerState
from cvserve.trace import Say

__all__ = [
    "estimate_bytes",
    "load_models",
    "load_servables",
    "new_state",
    "open_model",
    "store_versions",
]

#: onnxruntime's memory for a model, as a multiple of its weights file: the weights, their
#: pre-packed copies and the arena of intermediate tensors (measured on the zoo's CNNs at
#: batch 8: 1.5-3x). What a load is checked against before it opens anything.
RUNTIME_FACTOR = 3


def store_versions(
    mc: ModelConfig, cache: str | None, progress: Say | None = None
) -> dict[int, ModelMeta]:
    """Every version of ``mc``'s model in the store (a zoo model not built yet is built
    first, as version 1). ModelNotFound when there is none."""
    found = versions.model_versions(mc.store_name, cache)
    if not found:
        meta = store.ensure_built(mc.store_name, cache, progress=progress)
        found = {1: meta}
    return found


def wanted_versions(mc: ModelConfig, found: dict[int, ModelMeta]) -> list[int]:
    """The versions ``mc``'s policy serves of those ``found`` (ValueError when none)."""
    chosen = select_versions(mc.version_policy, found)
    if not chosen:
        raise ValueError(
            f"model {mc.name}: version policy {mc.version_policy} matches none of the "
            f"versions in the store ({', '.join(map(str, found))})"
        )
    return chosen


def estimate_bytes(path: str, mc: ModelConfig, meta: ModelMeta) -> int:
    """What opening version file ``path`` with ``mc``'s settings will take, before it is
    opened: the runtime (:data:`RUNTIME_FACTOR` x the weights, per instance) and the batch
    buffers (one more than instances, ``max_batch_size`` rows each)."""
    b = mc.batching
    weights = os.path.getsize(path)
    spec = meta.preprocess
    row = int(np.prod(spec.input_shape)) * (1 if meta.input_dtype == "uint8" else 4)
    return weights * RUNTIME_FACTOR * b.instances + (b.instances + 1) * b.max_batch_size * row


def check_fits(need: int, config: ServerConfig, held: int, what: str) -> None:
    """ModelTooLarge when ``need`` bytes more would not fit: the models' budget
    (``model_memory_bytes`` less ``held``, what loaded models take), else the memory
    available now."""
    if config.model_memory_bytes:
        room, where = config.model_memory_bytes - held, "model_memory_bytes left"
    else:
        room, where = available_memory(), "memory available"
    if need > room:
        raise ModelTooLarge(
            f"{what} needs about {need >> 20} MiB; {where}: {max(room, 0) >> 20} MiB",
            need_bytes=need, room_bytes=max(room, 0),
        )  # fmt: skip


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def open_model(
    config: ServerConfig,
    mc: ModelConfig,
    version: int,
    meta: ModelMeta,
    pool: PreprocessPool,
    metrics: Metrics,
    *,
    warm: bool = False,
    pace: float = 0.0,
) -> ModelServer:
    """Open version ``version`` of ``mc``'s model (in the calling thread), and with
    ``warm`` run every batch size through it (at ``pace``: see ``ModelServer.warm_up``);
    the resident memory this took is its ``runtime_bytes`` (an estimate: other threads
    allocate meanwhile)."""
    path = store.version_dir(mc.store_name, version, config.cache_dir) / meta.onnx_file
    before = _rss()
    ms = ModelServer(
        meta, str(path), mc, pool, max_pixels=config.max_pixels,
        on_batch=metrics.batch_observer(mc.name), version=version,
    )  # fmt: skip
    if warm:
        ms.warm_up(pace)
        ms.warmed = True
    after = _rss()
    if before is not None and after is not None:
        ms.runtime_bytes = max(0, after - before)
    return ms


def load_models(
    config: ServerConfig, pool: PreprocessPool, metrics: Metrics, progress: Say | None = None
) -> dict[str, dict[str, ModelServer]]:
    """Build (in a child process, if needed) and open every configured model: each
    version its policy names, by model name then version."""
    models: dict[str, dict[str, ModelServer]] = {}
    for mc in config.models:
        found = store_versions(mc, config.cache_dir, progress)
        models[mc.name] = {
            str(v): open_model(config, mc, v, found[v], pool, metrics)
            for v in wanted_versions(mc, found)
        }
    return models


def load_servables(
    config: ServerConfig, pool: PreprocessPool, metrics: Metrics, progress: Say | None = None
) -> tuple[dict[str, Any], dict[str, Any], Any, dict[str, dict[str, ModelServer]]]:
    """Every model and pipeline ``config`` serves, loaded (not started), and the broker:
    ``(newest version of each model, pipelines, broker, every version of each model)``."""
    every = load_models(config, pool, metrics, progress)
    models = {name: list(v.values())[-1] for name, v in every.items()}
    pipelines: dict[str, Any] = {}
    broker = None
    if config.pipelines:
        from cvserve.brokers import broker_from_url, redact_url
        from cvserve.serving.pipelines.engine import PipelineServer

        broker = broker_from_url(config.broker)
        for pc in config.pipelines:
            if progress is not None:
                progress(f"loading pipeline {pc.name} ({pc.kind}) over {redact_url(config.broker)}")
            pipelines[pc.name] = PipelineServer(
                pc, pool, broker, max_pixels=config.max_pixels, cache_dir=config.cache_dir,
                metrics=metrics,
            )  # fmt: skip
    return models, pipelines, broker, every


def new_state(config: ServerConfig, metrics_dir: str | None = None) -> ServerState:
    """The state of a server that has loaded nothing yet (``metrics_dir``: one process of
    several, counting in prometheus-client's multiprocess directory)."""
    pool = PreprocessPool(
        config.resolved_preprocess_threads(), PixelBudget(config.resolved_pixels_in_flight())
    )
    # the request's context follows its work onto the pool's threads (logs: warnings)
    pool.executor = logs.ContextExecutor(pool.threads, thread_name_prefix="preprocess")
    return ServerState(config, pool=pool, metrics=Metrics(multiprocess_dir=metrics_dir))
