"""Loading what a server serves: every configured model and pipeline, built if needed,
and the state of a server that has loaded nothing yet."""

from __future__ import annotations

from typing import Any

from cvserve.config import ServerConfig
from cvserve.images.budget import PixelBudget
from cvserve.models import store
from cvserve.serving import logs
from cvserve.serving.app import ServerState
from cvserve.serving.core import PreprocessPool
from cvserve.serving.metrics import Metrics
from cvserve.serving.model import ModelServer
from cvserve.trace import Say

__all__ = ["load_models", "load_servables", "new_state"]


def load_models(
    config: ServerConfig, pool: PreprocessPool, metrics: Metrics, progress: Say | None = None
) -> dict[str, ModelServer]:
    """Build (in a child process, if needed) and load every configured model."""
    models: dict[str, ModelServer] = {}
    for mc in config.models:
        meta = store.ensure_built(mc.store_name, config.cache_dir, progress=progress)
        path = store.model_path(meta, config.cache_dir)
        models[mc.name] = ModelServer(
            meta, str(path), mc, pool, max_pixels=config.max_pixels,
            on_batch=metrics.batch_observer(mc.name),
        )  # fmt: skip
    return models


def load_servables(
    config: ServerConfig, pool: PreprocessPool, metrics: Metrics, progress: Say | None = None
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Every model and pipeline ``config`` serves, loaded (not started), and the broker."""
    models = load_models(config, pool, metrics, progress)
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
    return models, pipelines, broker


def new_state(config: ServerConfig, metrics_dir: str | None = None) -> ServerState:
    """The state of a server that has loaded nothing yet (``metrics_dir``: one process of
    several, counting in prometheus-client's multiprocess directory)."""
    pool = PreprocessPool(
        config.resolved_preprocess_threads(), PixelBudget(config.resolved_pixels_in_flight())
    )
    # the request's context follows its work onto the pool's threads (logs: warnings)
    pool.executor = logs.ContextExecutor(pool.threads, thread_name_prefix="preprocess")
    return ServerState(config, pool=pool, metrics=Metrics(multiprocess_dir=metrics_dir))
