"""The one entry point: ``cvserve serve|worker|broker|bench|demo|models|report|study|profile|tune``.

Only this module prints; everything it calls reports through return values and logging.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cvserve import __version__

# --- shared ---------------------------------------------------------------------------
#: ``[worker N] `` in a process of ``serve --workers``: its lines share the parent's stderr.
_SAY_PREFIX = ""


def _say(message: str) -> None:
    print(_SAY_PREFIX + message, file=sys.stderr, flush=True)


def _csv_floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _csv_ints(text: str) -> list[int]:
    values = _csv_floats(text)
    if any(v != int(v) or v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers: {text!r}")
    return [int(v) for v in values]


def _add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        help="model store (default: $CVSERVE_CACHE or ~/.cache/cvserve)",
    )


# --- models ---------------------------------------------------------------------------
def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build, list, add and show models in the model store")
    msub = p.add_subparsers(dest="models_command", required=True)

    b = msub.add_parser("build", help="build a zoo model (or a local HF folder) to ONNX")
    b.add_argument("name", nargs="?", help="zoo model name (see `cvserve models list`)")
    b.add_argument("--from-dir", help="a local HuggingFace save_pretrained folder (real weights)")
    b.add_argument("--as", dest="store_name", help="store name for --from-dir")
    b.add_argument("--force", action="store_true", help="rebuild a zoo model that is built")
    b.add_argument(
        "--fold-normalize", action="store_true",
        help="also store NAME-u8: the same model taking uint8 pixels, normalizing in its graph",
    )  # fmt: skip
    _add_cache_arg(b)
    b.set_defaults(func=_cmd_models_build)

    ls = msub.add_parser("list", help="every zoo model, built or not, and every stored model")
    _add_cache_arg(ls)
    ls.set_defaults(func=_cmd_models_list)

    sh = msub.add_parser("show", help="a model's metadata: input, preprocessing, labels")
    sh.add_argument("name")
    _add_cache_arg(sh)
    sh.set_defaults(func=_cmd_models_show)

    a = msub.add_parser("add", help="register your own ONNX file")
    a.add_argument("file", help="the .onnx file (one NCHW image input)")
    a.add_argument("--name", help="store name (default: the file's stem)")
    a.add_argument("--task", default="classify", choices=["classify"])
    a.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    a.add_argument(
        "--resize",
        type=int,
        help="shortest edge before the center crop (default size/0.875); 0 = direct resize",
    )
    a.add_argument("--mean", type=_csv_floats, default=None, help="3 values (default ImageNet)")
    a.add_argument("--std", type=_csv_floats, default=None, help="3 values (default ImageNet)")
    a.add_argument("--interpolation", default="bilinear")
    a.add_argument("--labels", help="a text file with one label per line")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument(
        "--fold-normalize", action="store_true",
        help="also store NAME-u8, taking uint8 pixels and normalizing in its graph",
    )  # fmt: skip
    _add_cache_arg(a)
    a.set_defaults(func=_cmd_models_add)


def _cmd_models_build(args: argparse.Namespace) -> int:
    from cvserve.models import store

    if args.from_dir:
        meta = store.build_from_dir(args.from_dir, args.store_name, args.cache_dir, progress=_say)
    elif args.name:
        meta = store.ensure_built(args.name, args.cache_dir, progress=_say, force=args.force)
    else:
        _say("name a zoo model (cvserve models list) or pass --from-dir")
        return 2
    print(f"{meta.name}: {store.model_path(meta, args.cache_dir)}")
    if args.fold_normalize:
        _print_folded(meta.name, args.cache_dir)
    return 0


def _print_folded(name: str, cache_dir: str | None) -> None:
    from cvserve.models import store

    folded = store.fold_normalize(name, cache=cache_dir, overwrite=True)
    print(f"{folded.name}: {store.model_path(folded, cache_dir)} (uint8 input, normalize folded)")


def _cmd_models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cvserve.models import store

    table = Table(title=f"models in {store.cache_dir(args.cache_dir)}")
    for col in ("name", "task", "built", "source"):
        table.add_column(col)
    for e in store.list_models(args.cache_dir):
        table.add_row(e.name, e.task, "yes" if e.built else "no", e.source)
    Console().print(table)
    return 0


def _cmd_models_show(args: argparse.Namespace) -> int:
    import json

    from cvserve.models import store

    meta = store.load_meta(args.name, args.cache_dir)
    d = store.describe(meta, args.cache_dir)
    d.pop("labels", None)
    print(json.dumps(d, indent=2, default=str))
    return 0


def _cmd_models_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
    from cvserve.models import store

    for key in ("mean", "std"):
        v = getattr(args, key)
        if v is not None and len(v) != 3:
            _say(f"--{key} needs 3 comma-separated values")
            return 2
    resize = args.resize if args.resize is not None else int(args.size / 0.875)
    spec = PreprocessSpec(
        height=args.size,
        width=args.size,
        resize_mode="direct" if resize == 0 else "shortest_edge_crop",
        resize_shortest=resize or None,
        interpolation=args.interpolation,
        mean=tuple(args.mean or IMAGENET_MEAN),
        std=tuple(args.std or IMAGENET_STD),
    )
    labels = None
    if args.labels:
        labels = [ln.strip() for ln in Path(args.labels).read_text().splitlines() if ln.strip()]
    meta = store.add_model(
        args.file,
        name=args.name,
        task=args.task,
        spec=spec,
        labels=labels,
        cache=args.cache_dir,
        overwrite=args.overwrite,
    )
    print(f"added {meta.name}: input {meta.input_name} {meta.input_shape} {meta.input_dtype}")
    if args.fold_normalize:
        _print_folded(meta.name, args.cache_dir)
    return 0


# --- serve ----------------------------------------------------------------------------
def _queue_wait(text: str) -> float | None:
    from cvserve.config import queue_wait_ms

    try:
        return queue_wait_ms(text if text == "auto" else float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_batching_args(p: argparse.ArgumentParser) -> None:
    from cvserve.config import BatchConfig

    d = BatchConfig()
    p.add_argument("--max-batch", type=int, default=d.max_batch_size, help="max batch size")
    p.add_argument(
        "--max-delay-ms", type=float, default=d.max_delay_ms,
        help="longest wait for a batch to fill, from its first request",
    )  # fmt: skip
    p.add_argument("--instances", type=int, default=d.instances, help="model instances")
    p.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help="requests admitted per model before new ones get 429",
    )  # fmt: skip
    p.add_argument(
        "--max-queue-wait-ms", type=_queue_wait, default=argparse.SUPPRESS, metavar="MS|auto",
        help="429 at once for a request whose expected wait (requests ahead / measured "
        "service rate + one batch) exceeds MS or its deadline; auto (models' default): the "
        "time to serve 2 full rounds of batches on an accelerator, 1.25 on a CPU; 0 "
        "(pipelines' default): off, only the deadline and --max-queue count",
    )  # fmt: skip
    p.add_argument(
        "--timeout-ms", type=float, default=d.timeout_ms,
        help="default request deadline (504 after it; header X-Timeout-Ms overrides)",
    )  # fmt: skip
    p.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="onnxruntime threads per instance (default: cores / instances)",
    )  # fmt: skip
    p.add_argument(
        "--decoder", default="pil-reduced",
        choices=["pil-reduced", "simplejpeg", "opencv", "pil"],
        help="JPEG decoding: reduced-scale DCT decode with Pillow (default), simplejpeg or "
        "OpenCV, or 'pil' to always decode at full size",
    )  # fmt: skip
    p.add_argument(
        "--preprocess-threads", type=int, default=0,
        help="threads that decode/resize/normalize (default: cores)",
    )  # fmt: skip
    _add_runtime_args(p)
    _add_cache_arg(p)


def _add_runtime_args(p: argparse.ArgumentParser, *, stage: bool = False) -> None:
    """--runtime and the simulated runtime's flags; ``stage``: for ``cvserve worker`` (the
    DNNs of one pipeline stage: no copy time, no GPU flags)."""
    from cvserve.config import RUNTIMES
    from cvserve.runtime.simulated import packaged_profiles

    p.add_argument(
        "--runtime", default="onnxruntime", choices=RUNTIMES,
        help="onnxruntime (default), or simulated: an accelerator that takes --sim-profile's "
        "time per batch, burns no host CPU and returns outputs of the right shapes "
        "(responses carry sim=1 in Server-Timing, also from a worker's stage)",
    )  # fmt: skip
    p.add_argument(
        "--sim-profile", metavar="FILE|NAME|1:0.9,8:2.4",
        help="latency per batch size for --runtime simulated (of every DNN of the stage, for "
        "a worker): batch:ms pairs, a profile JSON (see `cvserve profile`), or a packaged "
        "profile: " + (", ".join(packaged_profiles()) or "none"),
    )  # fmt: skip
    p.add_argument(
        "--sim-devices", type=int, default=1,
        help="simulated devices (per DNN in a worker) shared by the instances, one batch at a "
        "time each (default 1)",
    )  # fmt: skip
    if stage:
        return
    p.add_argument(
        "--sim-h2d-gbps", type=float, default=None,
        help="simulated host<->device copy rate in GB/s (default: copies take no time)",
    )  # fmt: skip
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    from cvserve.config import PREPROCESS_DEVICES
    from cvserve.runtime.providers import PROVIDER_CHOICES

    p.add_argument(
        "--device", default="cpu", metavar="cpu|cuda[:N]",
        help="run the model on the CPU (default) or a GPU: onnxruntime's TensorRT provider "
        "when present, else CUDA; an error at start-up when neither is (never the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--gpu-provider", default="auto", choices=PROVIDER_CHOICES,
        help="with --device cuda: TensorRT when present else CUDA (auto), or only one",
    )  # fmt: skip
    p.add_argument("--fp16", action="store_true", help="let TensorRT build FP16 kernels")
    p.add_argument(
        "--trt-cache", metavar="DIR",
        help="TensorRT engine cache (default: trt/ in the model cache)",
    )  # fmt: skip
    p.add_argument(
        "--preprocess", dest="preprocess_device", default="cpu", choices=PREPROCESS_DEVICES,
        help="decode/resize on the cpu (default), the gpu (nvJPEG; other formats and "
        "failures fall back to the CPU per image) or auto (per image, whichever is sooner)",
    )  # fmt: skip


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over HTTP")
    p.add_argument("--model", action="append", help="model to serve (repeatable)")
    p.add_argument(
        "--pipeline", action="append",
        help="multi-DNN pipeline to serve (repeatable): ocr, detect-classify",
    )  # fmt: skip
    p.add_argument("--config", help="YAML file: models and pipelines with their own settings")
    p.add_argument(
        "--broker", default=None,
        help="where pipeline stages meet: inprocess:// (default) or "
        "redis://[[user]:password@]host:port (rediss:// for TLS)",
    )  # fmt: skip
    p.add_argument(
        "--stage-workers", type=int, default=None,
        help="pipeline stage-B workers inside each server process (0: only `cvserve "
        "worker`s; default: one per core of the pipeline's CPU budget)",
    )  # fmt: skip
    _add_cores_arg(p)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--grpc-port", type=int, default=None,
        help="also serve KServe v2 gRPC (tritonclient.grpc) on this port (default: off)",
    )  # fmt: skip
    _add_front_args(p)
    _add_batching_args(p)
    p.add_argument(
        "--max-body-mb", type=float, default=32.0, help="largest request body (413 above it)"
    )
    p.add_argument(
        "--max-pixels", type=int, default=None,
        help="largest decoded image in pixels (413 above it; checked before decoding)",
    )  # fmt: skip
    p.add_argument(
        "--max-pixels-in-flight", type=int, default=0, metavar="PIXELS",
        help="decoded pixels in flight at once, all requests together (counted from the "
        "headers before decoding; an image that does not fit gets 429); default: half the "
        "memory available at start-up, at 12 bytes a pixel",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)


def _add_front_args(p: argparse.ArgumentParser) -> None:
    """Shutdown, API keys, TLS and the metrics port of ``serve`` (a --config file's
    ``server:`` keys of the same names, which these flags override)."""
    g = p.add_argument_group("shutdown, security and metrics")
    g.add_argument(
        "--drain-delay", type=float, default=None, metavar="S", dest="drain_delay_s",
        help="after SIGTERM: /readyz fails at once, new work is still served for S seconds "
        "(a load balancer's time to stop sending), then refused with 503 (default 0)",
    )  # fmt: skip
    g.add_argument(
        "--drain-timeout", type=float, default=None, metavar="S", dest="drain_timeout_s",
        help="longest wait for in-flight requests after SIGTERM (default 30)",
    )  # fmt: skip
    g.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="N server processes sharing --port (SO_REUSEPORT; the kernel spreads the "
        "connections), each with every model, under a parent that restarts one that dies "
        "and drains them all on SIGTERM; threads default to cores / N each (default 1: "
        "this process)",
    )  # fmt: skip
    # a process of --workers: its index and the pipe it says "ready" on (not for users)
    g.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--reuse-port", action="store_true", default=None,
        help="share --port with other servers (SO_REUSEPORT): start a replacement, then "
        "SIGTERM the old one; a server joins the port once its models are loaded",
    )  # fmt: skip
    g.add_argument(
        "--api-key-file", metavar="FILE",
        help="require 'Authorization: Bearer KEY' (gRPC: authorization metadata), one key a "
        "line in FILE; health and readiness stay open",
    )  # fmt: skip
    g.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM), HTTP and gRPC")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    g.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="/metrics (and /healthz, /readyz) on this port instead, plain HTTP, no API key",
    )  # fmt: skip


_FRONT_KEYS = ("drain_delay_s", "drain_timeout_s", "reuse_port", "workers", "api_key_file",
               "tls_cert", "tls_key", "metrics_port")  # fmt: skip


def server_config_from_args(args: argparse.Namespace):
    """Flags to a ServerConfig; a --config file wins for everything it sets."""
    from dataclasses import replace

    from cvserve.config import (
        BatchConfig,
        ConfigError,
        ModelConfig,
        PipelineConfig,
        ServerConfig,
        load_config,
    )

    overrides = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    for key in ("host", "port"):  # a --config file's server: host/port, unless given here
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "grpc_port", None) is not None:
        overrides["grpc_port"] = args.grpc_port
    if getattr(args, "broker", None):
        overrides["broker"] = args.broker
    for key in _FRONT_KEYS:
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if getattr(args, "config", None):
        if args.model or args.pipeline:
            raise ConfigError("--config names what to serve: drop --model/--pipeline")
        cfg = load_config(args.config)
        return replace(cfg, **overrides)
    if not args.model and not args.pipeline:
        raise ConfigError("nothing to serve: pass --model, --pipeline or --config")
    # unset: each its own default (models: auto; pipelines: off)
    queue_wait = (
        {"max_queue_wait_ms": args.max_queue_wait_ms} if "max_queue_wait_ms" in args else {}
    )
    batching = BatchConfig(
        max_batch_size=args.max_batch,
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
    if getattr(args, "max_body_mb", None):
        extra["max_body_bytes"] = int(args.max_body_mb * 1024 * 1024)
    return ServerConfig(
        preprocess_threads=args.preprocess_threads,
        models=models,
        pipelines=pipelines,
        **extra,
        **overrides,
    )


def _pipeline_runtime(args: argparse.Namespace) -> dict:
    """--runtime/--sim-profile/--sim-devices for a pipeline: one profile for every DNN
    of the stages this process runs (per-DNN profiles: a --config file)."""
    from cvserve.config import ConfigError

    if getattr(args, "sim_h2d_gbps", None) is not None:
        raise ConfigError("--sim-h2d-gbps applies to models only: a pipeline's simulated "
                          "DNNs take no copy time (drop it, or serve the model alone)")  # fmt: skip
    return {
        "runtime": getattr(args, "runtime", "onnxruntime"),
        "sim_profile": getattr(args, "sim_profile", None),
        "sim_devices": getattr(args, "sim_devices", 1),
    }


def _cmd_serve(args: argparse.Namespace) -> int:
    from cvserve.serving.server import run_server

    cfg = server_config_from_args(args)
    if args.worker_index is not None:
        return _serve_as_worker(args, cfg)
    names = [m.name for m in cfg.models] + [p.name for p in cfg.pipelines]
    procs = f" in {cfg.workers} processes" if cfg.workers > 1 else ""
    _say(f"cvserve {__version__}: serving {', '.join(names)}{procs}")
    if cfg.workers > 1:
        from cvserve.serving.workers import run_workers

        return run_workers(cfg, on_ready=lambda url: _say(f"ready on {url}"), verbose=args.verbose)
    run_server(cfg, progress=_say, on_ready=lambda url: _say(f"ready on {url}"))
    return 0


def _serve_as_worker(args: argparse.Namespace, cfg) -> int:
    """One process of ``serve --workers N`` (its parent made ``cfg``): say "ready" on the
    parent's pipe, count metrics in the parent's multiprocess directory."""
    from cvserve.serving.server import run_server
    from cvserve.serving.workers import die_with_parent, metrics_dir

    die_with_parent()
    ready = os.fdopen(args.ready_fd, "w", buffering=1) if args.ready_fd is not None else None

    def on_ready(url: str) -> None:
        if ready is not None:
            ready.write(url + "\n")  # the parent says "ready on" once every process is

    run_server(cfg, progress=_say, on_ready=on_ready, metrics_dir=metrics_dir(),
               own_metrics_port=False)  # fmt: skip
    return 0


# --- worker ---------------------------------------------------------------------------
def _add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve one pipeline stage from a broker (scale a stage out across processes)",
    )
    p.add_argument("--pipeline", required=True, help="pipeline name as served (e.g. ocr)")
    p.add_argument("--kind", help="pipeline kind (default: the pipeline's name)")
    p.add_argument("--stage", required=True, help="stage to serve (ocr: rec)")
    p.add_argument(
        "--broker", required=True,
        help="redis://[[user]:password@]host:port (rediss:// for TLS)",
    )  # fmt: skip
    p.add_argument("--instances", type=int, default=1, help="model instances in this process")
    p.add_argument("--max-batch", type=int, default=16, help="items per batch")
    p.add_argument("--intra-op-threads", type=int, default=0)
    _add_cores_arg(p)
    p.add_argument(
        "--reclaim-idle-ms", type=int, default=5_000,
        help="take over items another worker left unacknowledged this long (live workers "
        "touch theirs every third of it while they run; default 5000)",
    )  # fmt: skip
    p.add_argument(
        "--max-deliveries", type=int, default=3,
        help="deliveries of one item before it goes to the dead letters and its request "
        "gets an error (see `cvserve broker dead-letters`)",
    )  # fmt: skip
    p.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE",
        help="a pipeline-kind setting (detect-classify: classifier=resnet18)",
    )  # fmt: skip
    _add_runtime_args(p, stage=True)
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_worker)


def _add_cores_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pipeline-cores", type=int, default=0, metavar="N",
        help="cores a pipeline's DNN calls share in this process: a call that is alone "
        "runs on all of them, the others on one each (0: all this process may use; -1: "
        "no budget, every session takes onnxruntime's threads)",
    )  # fmt: skip


def _cmd_worker(args: argparse.Namespace) -> int:
    from cvserve.config import PipelineConfig
    from cvserve.serving.pipelines.stage_process import run_stage_process

    cfg = PipelineConfig(
        name=args.pipeline,
        kind=args.kind or "",
        instances=args.instances,
        max_batch_size=args.max_batch,
        intra_op_threads=args.intra_op_threads,
        cores=args.pipeline_cores,
        reclaim_idle_ms=args.reclaim_idle_ms,
        max_deliveries=args.max_deliveries,
        params=_kv(args.param),
        **_pipeline_runtime(args),
    )
    return run_stage_process(cfg, args.stage, args.broker, say=_say, cache_dir=args.cache_dir)


# --- broker ---------------------------------------------------------------------------
def _add_broker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="inspect a pipeline broker (dead letters)")
    bsub = p.add_subparsers(dest="broker_command", required=True)
    d = bsub.add_parser(
        "dead-letters",
        help="items moved aside after --max-deliveries: where, why, how often delivered",
    )
    d.add_argument(
        "--broker", required=True,
        help="redis://[[user]:password@]host:port/db (rediss:// for TLS; ?prefix= as served)",
    )  # fmt: skip
    d.add_argument("--pipeline", help="only this pipeline's topics (default: every topic)")
    d.add_argument("--count", type=int, default=100, help="newest N per topic (default 100)")
    d.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    d.set_defaults(func=_cmd_dead_letters)


def _cmd_dead_letters(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import time

    from cvserve.brokers import broker_from_url

    if args.broker.startswith("inprocess:"):
        raise ValueError(
            "an in-process broker keeps its dead letters inside the serving process; "
            "pass the redis:// URL the pipeline is served over"
        )

    async def fetch():
        async with broker_from_url(args.broker) as broker:
            return broker.safe_url, await broker.dead_letters(count=args.count)

    where, letters = asyncio.run(fetch())
    if args.pipeline:
        letters = [d for d in letters if d.topic.startswith(f"{args.pipeline}.")]
    for d in letters:
        row = {
            "id": d.id, "topic": d.topic, "entry": d.entry, "group": d.group,
            "request_id": d.request_id, "index": None if d.message is None else d.message.index,
            "deliveries": d.deliveries, "reason": d.reason, "consumer": d.consumer,
            "dead_at": d.dead_at,
        }  # fmt: skip
        if args.json:
            print(json.dumps(row))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.dead_at))
        index = "-" if row["index"] is None else row["index"]
        print(
            f"{when}  {d.topic}  {d.id}  request {d.request_id or '-'} item {index}  "
            f"deliveries {d.deliveries}  {d.reason}"
        )
    scope = f"pipeline {args.pipeline}" if args.pipeline else "all topics"
    _say(f"{len(letters)} dead letters ({scope}) on {where}")
    return 0


def _kv(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE flags; numbers become numbers."""
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


# --- bench / report -------------------------------------------------------------------
def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from dataclasses import fields
    from types import SimpleNamespace

    from cvserve.bench import BenchConfig

    d = SimpleNamespace(**{f.name: f.default for f in fields(BenchConfig)})
    p = sub.add_parser(
        "bench",
        help="measure a server with real images: throughput, latency, stage breakdown",
        description="Closed-loop sweeps (--concurrency) and open-loop Poisson arrivals (--rate) "
        "against a running server, or one started for the run (--inprocess).",
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8000",
        help="server base URL (grpc://host:port for --protocol v2-grpc)",
    )  # fmt: skip
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="model name on the server")
    target.add_argument("--pipeline", help="pipeline name on the server (e.g. ocr)")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument(
        "--protocol", choices=["v1", "v2-http", "v2-grpc"], default=d.protocol,
        help="v1: cvserve's /v1 predict route; v2-http, v2-grpc: KServe v2 (any v2 server, "
        "e.g. Triton), the image as a BYTES input (default v1)",
    )  # fmt: skip
    p.add_argument(
        "--input-tensor", action="store_true",
        help="v2: send the model's own input tensor (each image preprocessed once, up front, "
        "by cvserve's preprocessing), not the encoded image",
    )  # fmt: skip
    p.add_argument("--input-name", help="v2: the input to fill (default: from the metadata)")
    p.add_argument(
        "--json-tensors", action="store_true",
        help="v2-http with --input-tensor: tensors as JSON data, not binary",
    )  # fmt: skip
    p.add_argument(
        "--grpc-target", help="v2-grpc: host:port, when --url is the server's HTTP URL"
    )  # fmt: skip
    sec = p.add_argument_group("API key and TLS (a server started with --api-key-file/--tls-cert)")
    sec.add_argument(
        "--api-key-file", metavar="FILE",
        help="send the key on FILE's first line as 'Authorization: Bearer KEY' (gRPC: "
        "metadata); default: $CVSERVE_API_KEY if set",
    )  # fmt: skip
    sec.add_argument(
        "--tls-ca", metavar="FILE",
        help="trust this PEM certificate (a self-signed server's) for https:// and grpcs:// "
        "URLs, instead of the system's roots",
    )  # fmt: skip
    sec.add_argument(
        "--tls-insecure", action="store_true",
        help="https:// without checking the server's certificate (testing only)",
    )  # fmt: skip
    p.add_argument("--concurrency", type=_csv_ints, help="closed loop: e.g. 1,2,4,8,16,32")
    p.add_argument("--rate", type=_csv_floats, help="open loop, requests/s: e.g. 20,40,80")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help="seconds measured per point")
    stop.add_argument("--requests", type=int, help="requests measured per point")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring")
    p.add_argument(
        "--window", type=float, default=d.window,
        help="stability window (s) when neither --duration nor --requests is given",
    )  # fmt: skip
    p.add_argument(
        "--tolerance", type=float, default=d.tolerance,
        help="three consecutive windows within this fraction = stable",
    )  # fmt: skip
    p.add_argument("--max-duration", type=float, default=d.max_duration, help="cap per point (s)")
    p.add_argument("--timeout", type=float, default=d.timeout, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the open-loop arrivals")
    p.add_argument("--max-in-flight", type=int, default=d.max_in_flight)
    p.add_argument("--no-retry-after", action="store_true", help="ignore 429 Retry-After")
    p.add_argument(
        "--ready-timeout", type=float, default=d.ready_timeout,
        help="wait this long for /readyz before giving up",
    )  # fmt: skip
    p.add_argument("--label", help="name of this run in reports")
    p.add_argument("--out", help="write the result here (JSON, with per-request rows in .npz)")
    p.add_argument(
        "--inprocess", action="store_true",
        help="start `cvserve serve` with --serve-args for this run, then stop it",
    )  # fmt: skip
    p.add_argument(
        "--serve-args", default="",
        help="flags for the --inprocess server, e.g. '--max-batch 8 --max-delay-ms 5'",
    )  # fmt: skip
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import shlex

    from rich.console import Console

    from cvserve.bench import (
        BenchConfig,
        BenchError,
        ImageSourceError,
        ProgressReporter,
        breakdown_table,
        run_bench,
        save_result,
        summary_table,
    )

    api_key = _bench_api_key(args.api_key_file)
    server = contextlib.nullcontext()
    url = args.url
    if args.inprocess:
        from cvserve.serving.server import ServerProcess, free_port

        what = ["--pipeline", args.pipeline] if args.pipeline else ["--model", args.model]
        serve = [*what, *shlex.split(args.serve_args)]
        if args.cache_dir:
            serve += ["--cache-dir", args.cache_dir]
        if args.protocol == "v2-grpc" and "--grpc-port" not in serve:
            serve += ["--grpc-port", str(free_port())]
        _say(f"starting cvserve serve {' '.join(serve)}")
        server = ServerProcess(serve)
        url = server.url
        if args.protocol == "v2-grpc":
            args.grpc_target = f"127.0.0.1:{serve[serve.index('--grpc-port') + 1]}"
    try:
        with server:
            config = BenchConfig(
                url=url,
                model=args.pipeline or args.model,
                kind="pipeline" if args.pipeline else "model",
                images=args.images,
                concurrency=args.concurrency,
                rates=args.rate,
                duration=args.duration,
                requests=args.requests,
                warmup=args.warmup,
                window=args.window,
                tolerance=args.tolerance,
                max_duration=args.max_duration,
                timeout=args.timeout,
                seed=args.seed,
                max_in_flight=args.max_in_flight,
                honor_retry_after=not args.no_retry_after,
                ready_timeout=args.ready_timeout,
                label=args.label,
                protocol=args.protocol,
                input_name=args.input_name,
                input_tensor=args.input_tensor,
                json_tensors=args.json_tensors,
                grpc_target=args.grpc_target,
                api_key=api_key,
                tls_ca=args.tls_ca,
                tls_insecure=args.tls_insecure,
            )
            with ProgressReporter(Console(stderr=True)) as progress:
                result = run_bench(config, progress=progress, command=sys.argv)
    except (BenchError, ImageSourceError) as e:
        _say(f"error: {e}")
        return 2
    console = Console()
    console.print(summary_table(result))
    console.print(breakdown_table(result))
    if args.out:
        _say(f"wrote {save_result(result, args.out)}")
    return 0


def _bench_api_key(path: str | None) -> str | None:
    """The bench's API key: ``path``'s first non-empty line, else $CVSERVE_API_KEY."""
    if path is None:
        return os.environ.get("CVSERVE_API_KEY") or None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            return line.strip()
    raise OSError(f"{path} has no key")


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="plot bench results: throughput/latency vs load, breakdown bars, latency CDF",
    )
    p.add_argument("results", nargs="+", help="result JSON files from `cvserve bench --out`")
    p.add_argument("--out", default="report", help="folder for the PNG plots (default ./report)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from cvserve.bench import ResultError, report

    try:
        paths = report(args.results, args.out)
    except ResultError as e:
        _say(f"error: {e}")
        return 2
    for path in paths:
        print(path)
    return 0


# --- study ----------------------------------------------------------------------------
def _add_study_parser(sub: argparse._SubParsersAction) -> None:
    from cvserve.study.results import EXPERIMENTS

    p = sub.add_parser(
        "study",
        help="rerun the paper's experiments on this machine and write a report with plots",
        description="Runs the experiments of 'Beyond Inference' (DAC 2024) against servers it "
        "starts itself: " + ", ".join(EXPERIMENTS) + ". Writes one JSON per experiment, "
        "CSVs, PNG/SVG plots and a self-contained report.html to --out. The accelerator "
        "experiment uses the simulated accelerator runtime and says so everywhere.",
    )
    p.add_argument("--out", default="study", help="output folder (default ./study)")
    p.add_argument(
        "--quick", action="store_true",
        help="tiny models and short points: a few minutes on 2 cores (default: ~45 min at most)",
    )  # fmt: skip
    p.add_argument(
        "--only", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        help="comma-separated experiments to run: " + ",".join(EXPERIMENTS),
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="reuse the points (and measurements) a previous run left in --out",
    )  # fmt: skip
    p.add_argument(
        "--images", help="folder with small/, medium/ and large/ photos "
        "(default: ../shared/data/images); OCR images come from its sibling ocr/",
    )  # fmt: skip
    p.add_argument("--model", help="classifier for setups/concurrency/image-sizes/accelerator")
    p.add_argument("--duration", type=float, help="seconds measured per point")
    p.add_argument(
        "--sim-profile", action="append", default=[], metavar="FILE|NAME|1:0.9,8:2.4",
        help="also run the accelerator experiment with this latency profile (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--report-only", action="store_true",
        help="run nothing: rewrite the report from the JSON files in --out",
    )  # fmt: skip
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    import textwrap
    import time
    from pathlib import Path

    from rich.console import Console

    from cvserve.study.report import write_report
    from cvserve.study.runner import StudyConfig, StudyError, run_study

    out = Path(args.out)
    # each simulated point's warning is kept in its results; the terminal shows progress
    logging.getLogger("cvserve.bench").setLevel(logging.ERROR)
    t0 = time.monotonic()
    command = ["cvserve", *sys.argv[1:]] if sys.argv[1:2] == ["study"] else ["cvserve", "study"]
    results = None
    if not args.report_only:
        config = StudyConfig(
            out=out,
            profile="quick" if args.quick else "default",
            only=args.only,
            resume=args.resume,
            images=Path(args.images) if args.images else None,
            cache_dir=args.cache_dir,
            model=args.model,
            duration=args.duration,
            sim_profiles=args.sim_profile,
        )
        try:
            with StudyProgress(Console(stderr=True)) as progress:
                results = run_study(config, progress=progress)
        except StudyError as e:
            _say(f"error: {e}")
            return 2
    elapsed = time.monotonic() - t0
    # The header reproduces the whole study; a partial or resumed run's time is not the
    # study's (the report then sums the experiments' own times).
    whole = not (args.only or args.resume or args.report_only)
    run_info = {"command": " ".join(_whole_study(command))}
    if whole:
        run_info["elapsed_s"] = elapsed
    html = write_report(out, run_info=run_info)
    for r in results or []:
        print(f"\n{r.title}" + (" [simulated]" if r.simulated else ""))
        for f in r.findings:
            print(textwrap.fill(f.text, 78, initial_indent="  ", subsequent_indent="  "))
        skipped = [p for p in r.points if p.status != "ok"]
        for p in skipped:
            print(textwrap.fill(f"{p.id}: {p.status}: {p.reason}", 78, initial_indent="  - ",
                                subsequent_indent="    "))  # fmt: skip
    print(f"\nreport: {html} ({elapsed:.0f} s)")
    return 0


def _whole_study(command: list[str]) -> list[str]:
    """``command`` without the flags that make it a partial run."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--only":
            skip = True
        elif arg not in ("--resume", "--report-only") and not arg.startswith("--only="):
            out.append(arg)
    return out


class StudyProgress:
    """One bar for the whole study: the current experiment and point, and the ETA."""

    def __init__(self, console) -> None:  # noqa: ANN001
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("study", total=None)

    def __enter__(self) -> StudyProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "plan":
            self.progress.update(self.task, total=max(event["total_s"], 1.0))
        elif kind == "message":
            self.progress.console.print(f"[dim]{event['message']}[/]")
        elif kind == "point":
            desc = f"{event['experiment']} {event['index'] + 1}/{event['points']} {event['point']}"
            self.progress.update(self.task, description=desc)
        elif kind == "done_point":
            self.progress.advance(self.task, event["expected_s"])


# --- demo -----------------------------------------------------------------------------
def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build a model, serve it, load it with real images, print where time went",
    )
    p.add_argument("--model", default="resnet18", help="zoo or stored model (default resnet18)")
    p.add_argument(
        "--images", help="folder of images (default: ../shared/data/images/medium if present)"
    )
    p.add_argument(
        "--concurrency", type=_csv_ints, default=[1, 4, 16],
        help="closed-loop concurrencies to measure (default 1,4,16)",
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument(
        "--serve-args", default="--max-batch 8 --max-delay-ms 5",
        help="extra `cvserve serve` flags for the demo server",
    )  # fmt: skip
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import shlex
    import time

    from rich.console import Console

    from cvserve.bench import ProgressReporter, breakdown_table, summary_table
    from cvserve.demo import run_demo

    console = Console(stderr=False)
    t0 = time.monotonic()
    with ProgressReporter(Console(stderr=True)) as progress:
        result = run_demo(
            model=args.model,
            images=args.images,
            concurrency=args.concurrency,
            duration=args.duration,
            cache_dir=args.cache_dir,
            serve_args=shlex.split(args.serve_args),
            say=_say,
            progress=progress,
        )
    console.print(summary_table(result, title=f"cvserve demo: {args.model}"))
    console.print(breakdown_table(result, title="mean time per request, by stage"))
    console.print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


# --- profile --------------------------------------------------------------------------
def _add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure a model's latency per batch size here: a profile for --runtime simulated",
        description="Runs the model with onnxruntime at each batch size (random inputs, median "
        "of --repeats runs after a warm-up), prints a table and writes a profile JSON "
        "(schema cvserve.profile/1) that `serve --runtime simulated --sim-profile` reads.",
    )
    p.add_argument("model", help="a zoo or stored model name, or a .onnx file")
    p.add_argument("--out", help="profile JSON to write (default: MODEL-profile.json)")
    p.add_argument(
        "--batch-sizes", type=_csv_ints, default=[1, 2, 4, 8, 16, 32],
        help="batch sizes to measure (default 1,2,4,8,16,32)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first")
    p.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="onnxruntime threads (default: onnxruntime's choice, one per core)",
    )  # fmt: skip
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cvserve.runtime.profile import measure_profile, profile_table

    path = Path(args.model)
    if path.suffix == ".onnx" and path.is_file():
        name, item_shape = path.stem, None
    else:
        from cvserve.models import store

        meta = store.ensure_built(args.model, args.cache_dir, progress=_say)
        name, path = meta.name, store.model_path(meta, args.cache_dir)
        item_shape = meta.preprocess.input_shape
    _say(f"profiling {name}: batch sizes {','.join(map(str, args.batch_sizes))}, "
         f"{args.repeats} runs each")  # fmt: skip
    profile = measure_profile(
        path,
        args.batch_sizes,
        repeats=args.repeats,
        threads=args.intra_op_threads,
        warmup=args.warmup,
        item_shape=item_shape,
        model=name,
        progress=lambda b, s: _say(f"  batch {b}: {s * 1000:.2f} ms"),
    )
    print(f"{name} on {profile.device} ({profile.runtime})")
    print("\n".join(profile_table(profile)))
    out = profile.save(args.out or f"{name}-profile.json")
    _say(f"wrote {out} (serve it with --runtime simulated --sim-profile {out})")
    return 0


# --- tune -----------------------------------------------------------------------------
def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="find the settings with the highest throughput whose p99 meets an SLO",
        description="Searches max batch, max delay, instances, intra-op threads, "
        "preprocessing threads and the JPEG decoder for MODEL, measuring every candidate "
        "with a real `cvserve serve` and a closed-loop concurrency sweep of --images. The "
        "search starts from the defaults (always measured first) and changes one knob at a "
        "time while it helps, within --budget seconds. Writes the winner to --out as a "
        "config for `cvserve serve --config`, keeps every measured candidate in "
        "OUT.tune.json (a rerun reuses them; --fresh starts over) and prints a table of "
        "them all. Exits 1 when no candidate meets the SLO.",
    )
    p.add_argument("model", help="a zoo or stored model name")
    p.add_argument("--images", required=True, help="folder (or file) of the images to send")
    p.add_argument(
        "--slo-p99-ms", type=float, required=True, metavar="MS",
        help="the p99 latency every measured point must stay within",
    )  # fmt: skip
    p.add_argument(
        "--budget", type=float, default=1800.0, metavar="SECONDS",
        help="wall time for the search (default 1800); a candidate is not started unless "
        "the longest measurement so far fits in what is left",
    )  # fmt: skip
    p.add_argument("--out", required=True, metavar="FILE.yaml", help="the winning config")
    p.add_argument(
        "--fresh", action="store_true",
        help="measure everything again (ignore the state file OUT.tune.json)",
    )  # fmt: skip
    p.add_argument(
        "--point-duration", type=float, default=5.0, metavar="S",
        help="seconds measured per concurrency point (default 5; more for slow models: a "
        "p99 wants a few hundred requests)",
    )  # fmt: skip
    p.add_argument("--warmup", type=float, default=1.0, metavar="S",
                   help="seconds of load before each point is measured (default 1)")  # fmt: skip
    p.add_argument(
        "--max-concurrency", type=int, default=64,
        help="highest closed-loop concurrency tried (default 64, the default --max-queue)",
    )  # fmt: skip
    p.add_argument(
        "--min-gain", type=float, default=0.03, metavar="FRACTION",
        help="a step must beat the best so far by more than this to count (default 0.03)",
    )  # fmt: skip
    _add_cache_arg(p)
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from cvserve.tune import TuneConfig, TuneError, TuneStateError, run_tune
    from cvserve.tune.console import TuneProgress, candidates_table

    # each point's warnings are in its numbers; the terminal shows progress
    logging.getLogger("cvserve.bench").setLevel(logging.ERROR)
    config = TuneConfig(
        model=args.model,
        images=args.images,
        slo_p99_ms=args.slo_p99_ms,
        out=args.out,
        budget_s=args.budget,
        fresh=args.fresh,
        cache_dir=args.cache_dir,
        point_s=args.point_duration,
        warmup_s=args.warmup,
        max_concurrency=args.max_concurrency,
        min_gain=args.min_gain,
        command=["cvserve", *sys.argv[1:]] if sys.argv[1:2] == ["tune"] else ["cvserve", "tune"],
    )
    try:
        with TuneProgress(Console(stderr=True)) as progress:
            report = run_tune(config, progress=progress)
    except (TuneError, TuneStateError) as e:
        _say(f"error: {e}")
        return 2
    res = report.result
    title = (f"cvserve tune {args.model}: {len(res.candidates)} candidates in "
             f"{report.elapsed_s:.0f} s ({res.stop_reason}), SLO p99 <= {args.slo_p99_ms:g} ms")  # fmt: skip
    Console(width=100).print(candidates_table(report.rows, args.slo_p99_ms, title))
    _say(f"state (every candidate): {report.state_path}")
    if res.winner is None:
        _say(f"no candidate met the SLO (p99 <= {args.slo_p99_ms:g} ms); {args.out} not written")
        return 1
    w, d = res.winner.measurement, res.default.measurement
    gain = (f"{w.throughput_rps / d.throughput_rps:.2f}x the defaults' {d.throughput_rps:.1f}"
            if d.meets_slo else "the defaults met no SLO point")  # fmt: skip
    print(f"winner: {res.winner.settings.label()}: {w.throughput_rps:.1f} req/s, p99 "
          f"{w.p99_ms:.0f} ms at c={w.concurrency} ({gain})")  # fmt: skip
    _say(f"wrote {report.config_path} (cvserve serve --config {report.config_path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cvserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(sub)
    _add_worker_parser(sub)
    _add_broker_parser(sub)
    _add_bench_parser(sub)
    _add_demo_parser(sub)
    _add_models_parser(sub)
    _add_report_parser(sub)
    _add_study_parser(sub)
    _add_profile_parser(sub)
    _add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    global _SAY_PREFIX
    args = build_parser().parse_args(argv)
    index = getattr(args, "worker_index", None)
    _SAY_PREFIX = f"[worker {index}] " if index is not None else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s {_SAY_PREFIX}%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as e:
        if args.verbose:  # the one-line message hides where it came from
            raise
        _say(f"error: {e} (-v for the traceback)")
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that deserve one line, not a traceback."""
    from cvserve.brokers.errors import BrokerError
    from cvserve.config import ConfigError
    from cvserve.models.store import InvalidModel, ModelBuildError, ModelNotFound

    return (
        BrokerError,
        ConfigError,
        InvalidModel,
        ModelBuildError,
        ModelNotFound,
        FileNotFoundError,
        FileExistsError,
        OSError,
        ValueError,
    )


if __name__ == "__main__":
    sys.exit(main())
