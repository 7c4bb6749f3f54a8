"""Command-line flags (an ``argparse.Namespace`` of ``cvserve serve`` or ``cvserve
worker``) to the typed settings: the CLI parses, this maps, so the flags and a config
file mean the same thing."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cvserve.config.checks import ConfigError
from cvserve.config.files import load_config
from cvserve.config.model import BatchConfig, ModelConfig
from cvserve.config.pipeline import PipelineConfig
from cvserve.config.server import ServerConfig

#: ``serve`` flags that a --config file's ``server:`` keys of the same names also set
#: (the flags win when given).
FRONT_KEYS = ("drain_delay_ms", "drain_timeout_ms", "reuse_port", "workers", "api_key_file",
              "tls_cert", "tls_key", "metrics_port", "max_header_bytes", "max_headers",
              "keep_alive_timeout_ms", "header_timeout_ms", "body_timeout_ms",
              "max_connections", "max_body_bytes_in_flight", "model_control",
              "poll_interval_ms", "model_memory_bytes", "trace_exporter",
              "trace_service_name")  # fmt: skip


def server_config_from_args(args: Any) -> ServerConfig:
    """``cvserve serve``'s flags to a ServerConfig; a --config file wins for everything it
    sets that no flag here overrides (host, port, grpc port, broker, cache and FRONT_KEYS)."""
    overrides = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    for key in ("host", "port", "grpc_port", *FRONT_KEYS):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    if getattr(args, "config", None):
        if args.model or args.pipeline:
            raise ConfigError("--config names what to serve: drop --model/--pipeline")
        return replace(load_config(args.config), **overrides)
    if not args.model and not args.pipeline:
        raise ConfigError("nothing to serve: pass --model, --pipeline or --config")
    # unset: each its own default (models: auto; pipelines: off)
    queue_wait = (
        {"max_queue_wait_ms": args.max_queue_wait_ms} if "max_queue_wait_ms" in args else {}
    )
    batching = BatchConfig(
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        instances=args.instances,
        max_queue=args.max_queue,
        timeout_ms=args.timeout_ms,
        **queue_wait,
    )
    models = tuple(
        ModelConfig(
            name=m,
            batching=batching,
            intra_op_threads=args.intra_op_threads,
            decoder=args.decoder,
            runtime=getattr(args, "runtime", "onnxruntime"),
            sim_profile=getattr(args, "sim_profile", None),
            sim_devices=getattr(args, "sim_devices", 1),
            sim_h2d_gbps=getattr(args, "sim_h2d_gbps", None),
            device=getattr(args, "device", "cpu"),
            gpu_provider=getattr(args, "gpu_provider", "auto"),
            fp16=getattr(args, "fp16", False),
            trt_cache=getattr(args, "trt_cache", None),
            preprocess_device=getattr(args, "preprocess_device", "cpu"),
            version_policy=getattr(args, "version_policy", None) or "latest:1",
            head=getattr(args, "head", None),
            torch_compile=getattr(args, "torch_compile", False),
            channels_last=getattr(args, "channels_last", False),
            precision=getattr(args, "precision", "fp32"),
            cuda_graphs=getattr(args, "cuda_graphs", False),
        )
        for m in args.model or []
    )
    pipelines = tuple(
        PipelineConfig(
            name=p,
            stage_workers=args.stage_workers,
            intra_op_threads=args.intra_op_threads,
            cores=args.pipeline_cores,
            timeout_ms=args.timeout_ms,
            max_queue=args.max_queue,
            **queue_wait,
            **_pipeline_runtime(args),
        )  # fmt: skip
        for p in args.pipeline or []
    )
    extra = {}
    if getattr(args, "max_pixels", None):
        extra["max_pixels"] = args.max_pixels
    if getattr(args, "max_pixels_in_flight", None):
        extra["max_pixels_in_flight"] = args.max_pixels_in_flight
    if getattr(args, "max_body_bytes", None):
        extra["max_body_bytes"] = args.max_body_bytes
    return ServerConfig(
        preprocess_threads=args.preprocess_threads,
        models=models,
        pipelines=pipelines,
        **extra,
        **overrides,
    )


def worker_config_from_args(args: Any) -> PipelineConfig:
    """``cvserve worker``'s flags to the PipelineConfig of the stage it serves: the
    pipeline ``--pipeline`` of ``--config`` (flags given on top), or the preset ``--kind``."""
    from dataclasses import replace

    if getattr(args, "config", None):
        from cvserve.config.files import load_config

        found = [p for p in load_config(args.config).pipelines if p.name == args.pipeline]
        if not found:
            raise ConfigError(f"{args.config} serves no pipeline {args.pipeline!r}")
        over = {"instances": args.instances, "max_batch_size": args.max_batch_size}
        return replace(found[0], **{k: v for k, v in over.items() if v is not None})
    return PipelineConfig(
        name=args.pipeline,
        kind=args.kind or "",
        instances=args.instances or 1,
        max_batch_size=args.max_batch_size or 16,
        intra_op_threads=args.intra_op_threads,
        cores=args.pipeline_cores,
        reclaim_idle_ms=args.reclaim_idle_ms,
        max_deliveries=args.max_deliveries,
        params=parse_params(args.param),
        **_pipeline_runtime(args),
    )


def worker_trace_settings(args: Any) -> tuple[str, str]:
    """``cvserve worker``'s trace exporter and service name: its flags, else the
    ``server:`` keys of its --config file (the server's own), else off."""
    d = ServerConfig()
    exporter, service = d.trace_exporter, d.trace_service_name
    if getattr(args, "config", None):
        server = load_config(args.config)
        exporter, service = server.trace_exporter, server.trace_service_name
    exporter = getattr(args, "trace_exporter", None) or exporter
    service = getattr(args, "trace_service_name", None) or service
    replace(d, trace_exporter=exporter, trace_service_name=service)  # checks both
    return exporter, service


def _pipeline_runtime(args: Any) -> dict:
    """--runtime/--sim-profile/--sim-devices for a pipeline: one profile for every DNN
    of the stages this process runs (per-DNN profiles: a --config file)."""
    if getattr(args, "sim_h2d_gbps", None) is not None:
        raise ConfigError("--sim-h2d-gbps applies to models only: a pipeline's simulated "
                          "DNNs take no copy time (drop it, or serve the model alone)")  # fmt: skip
    return {
        "runtime": getattr(args, "runtime", "onnxruntime"),
        "sim_profile": getattr(args, "sim_profile", None),
        "sim_devices": getattr(args, "sim_devices", 1),
    }


def parse_params(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE flags (``--param``); numbers become numbers."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out
