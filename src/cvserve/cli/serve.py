"""``cvserve serve``: its flags (batching, runtime, device, front door) and the command;
the flags become a ServerConfig in ``cvserve.config.flags``."""

from __future__ import annotations

import argparse
import os

from cvserve import __version__
from cvserve.cli._common import (
    add_cache_arg,
    add_renamed,
    add_seconds_alias,
    byte_size,
    port_number,
    say,
)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
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
    add_cores_arg(p)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=port_number, default=None,
        help="HTTP port, 1-65535, 0: any free one (default 8000)",
    )  # fmt: skip
    p.add_argument(
        "--grpc-port", type=port_number, default=None, metavar="PORT",
        help="also serve KServe v2 gRPC (tritonclient.grpc) on this port (default: off)",
    )  # fmt: skip
    _add_front_args(p)
    add_trace_args(p)
    _add_control_args(p)
    _add_batching_args(p)
    from cvserve.config import ServerConfig

    d = ServerConfig()
    p.add_argument(
        "--max-body-bytes", type=byte_size, default=None, metavar="BYTES",
        help="largest request body: bytes, or 32MiB, 500KB (413 above it; default "
        f"{d.max_body_bytes // 2**20}MiB)",
    )  # fmt: skip
    add_renamed(p, "--max-body-mb", "--max-body-bytes", "max_body_bytes",
                lambda mb: int(float(mb) * 2**20))  # fmt: skip
    p.add_argument(
        "--max-pixels", type=int, default=None,
        help="largest decoded image in pixels (413 above it; checked before decoding; "
        f"default {d.max_pixels})",
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
        "--drain-delay-ms", type=float, default=None, metavar="MS", dest="drain_delay_ms",
        help="after SIGTERM: /readyz fails at once, new work is still served for MS "
        "milliseconds (a load balancer's time to stop sending), then refused with 503 "
        "(default 0)",
    )  # fmt: skip
    g.add_argument(
        "--drain-timeout-ms", type=float, default=None, metavar="MS", dest="drain_timeout_ms",
        help="longest wait for in-flight requests after SIGTERM (default 30000)",
    )  # fmt: skip
    add_seconds_alias(g, "--drain-delay", "--drain-delay-ms", "drain_delay_ms")
    add_seconds_alias(g, "--drain-timeout", "--drain-timeout-ms", "drain_timeout_ms")
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
        "--metrics-port", type=port_number, default=None, metavar="PORT",
        help="/metrics (and /healthz, /readyz) on this port instead, plain HTTP, no API key",
    )  # fmt: skip
    g.add_argument("--max-header-bytes", type=int, default=None, metavar="N",
                   help="request line and headers, bytes (431 above; default 65536)")  # fmt: skip
    g.add_argument("--max-headers", type=int, default=None, metavar="N",
                   help="header fields in one request (431 above; default 100)")  # fmt: skip
    g.add_argument("--keep-alive-timeout-ms", type=float, default=None, metavar="MS",
                   help="close a connection with no request under way after MS (default "
                   "30000)")  # fmt: skip
    g.add_argument("--header-timeout-ms", type=float, default=None, metavar="MS",
                   help="a request's headers complete within MS of its first byte (408 "
                   "after; default 20000)")  # fmt: skip
    g.add_argument("--body-timeout-ms", type=float, default=None, metavar="MS",
                   help="close a request whose body gets no byte for MS (default 30000)")  # fmt: skip
    g.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="open HTTP connections; over it the least recently active idle one is "
                   "closed (503 when all are busy); default 0: 3/4 of the descriptor limit, "
                   "at most 4096")  # fmt: skip
    g.add_argument("--max-body-bytes-in-flight", type=int, default=None, metavar="BYTES",
                   help="request-body bytes being received at once, all connections together; "
                   "a body that would leave less room than it takes gets 503 + Retry-After "
                   "before it is read; default 0: twice the body limit, at most 1/8 of the "
                   "memory available")  # fmt: skip


def add_trace_args(p: argparse.ArgumentParser) -> None:
    """OpenTelemetry traces (``cvserve.otel``; a --config file's ``server:`` keys of the
    same names, which these flags override): ``serve`` and ``worker``."""
    from cvserve.config import TRACE_EXPORTERS

    g = p.add_argument_group("traces (docs/pipelines.md, the otel extra)")
    g.add_argument(
        "--trace-exporter", default=None, choices=TRACE_EXPORTERS,
        help="each request as an OpenTelemetry trace of its stages: none (default), "
        "console (stdout) or otlp (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, default "
        "localhost:4318); a client's traceparent header is its parent",
    )  # fmt: skip
    g.add_argument(
        "--trace-service-name", default=None, metavar="NAME",
        help="service.name of the traces (default cvserve)",
    )  # fmt: skip


def _add_control_args(p: argparse.ArgumentParser) -> None:
    """Models that change while the server runs (``cvserve.serving.control``; a --config
    file's ``server:`` keys of the same names, which these flags override)."""
    from cvserve.config import MODEL_CONTROL_MODES

    g = p.add_argument_group("model control (docs/model-control.md)")
    g.add_argument(
        "--model-control", default=None, choices=MODEL_CONTROL_MODES,
        help="none (default): what starts is served until exit; explicit: the repository "
        "API (POST /v2/repository/models/M/load, /v1/models/M:load) loads and unloads; "
        "poll: the store is watched and new or removed versions followed",
    )  # fmt: skip
    g.add_argument(
        "--poll-interval-ms", type=float, default=None, metavar="MS",
        help="with --model-control poll: how often the store is looked at (default 5000)",
    )  # fmt: skip
    g.add_argument(
        "--model-memory-bytes", type=int, default=None, metavar="BYTES",
        help="memory the loaded models may take together; a load past it is refused (507); "
        "default 0: the memory available at the time of the load",
    )  # fmt: skip
    g.add_argument(
        "--version-policy", default=None, metavar="POLICY",
        help="which versions of each --model are served: latest (default), latest:N, all, "
        "specific:1,3; unversioned requests go to the newest loaded",
    )  # fmt: skip


def _queue_wait(text: str) -> float | None:
    from cvserve.config import queue_wait_ms

    try:
        return queue_wait_ms(text if text == "auto" else float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_batching_args(p: argparse.ArgumentParser) -> None:
    from cvserve.config import BatchConfig

    d = BatchConfig()
    p.add_argument(
        "--max-batch-size", type=int, default=d.max_batch_size, metavar="N",
        help="largest batch (YAML: max_batch_size)",
    )  # fmt: skip
    add_renamed(p, "--max-batch", "--max-batch-size", "max_batch_size", int)
    p.add_argument(
        "--max-delay-ms", type=float, default=d.max_delay_ms, metavar="MS",
        help="longest wait for a batch to fill, from its first request",
    )  # fmt: skip
    p.add_argument("--instances", type=int, default=d.instances, metavar="N",
                   help="model instances")  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=d.max_queue, metavar="N",
        help="requests admitted per model before new ones get 429",
    )  # fmt: skip
    p.add_argument(
        "--max-queue-wait-ms", type=_queue_wait, default=argparse.SUPPRESS, metavar="MS|auto",
        help="429 at once for a request whose expected wait (requests ahead / measured "
        "service rate + one batch) exceeds MS or its deadline; auto (models' default): the "
        "time to serve 2 full rounds of batches on an accelerator, 1.25 on a CPU, applied "
        "only while the queue grows (arrivals keep coming at a full queue; many clients "
        "each waiting their turn are queued); 0 (pipelines' default): off, only the "
        "deadline and --max-queue count",
    )  # fmt: skip
    p.add_argument(
        "--timeout-ms", type=float, default=d.timeout_ms, metavar="MS",
        help="a request's deadline when its client sends none (504 after it; the header "
        "X-Timeout-Ms sets the client's own)",
    )  # fmt: skip
    p.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="onnxruntime threads per instance; torch's CPU threads with --runtime torch "
        "(default: cores / instances)",
    )  # fmt: skip
    p.add_argument(
        "--decoder", default="simplejpeg",
        choices=["simplejpeg", "pil-reduced", "opencv", "pil"],
        help="JPEG decoding: reduced-scale DCT decode with libjpeg-turbo's own entry point "
        "(simplejpeg, the default), Pillow or OpenCV, or 'pil' to always decode at full size",
    )  # fmt: skip
    p.add_argument(
        "--head", metavar="PACKAGE.MODULE:CLASS", default=None,
        help="post-process every --model with a head of your own (cvserve.tasks.base.TaskHead; "
        "default: the head of the model's task)",
    )  # fmt: skip
    p.add_argument(
        "--preprocess-threads", type=int, default=0,
        help="threads that decode/resize/normalize (default: cores)",
    )  # fmt: skip
    add_runtime_args(p)
    add_cache_arg(p)


def add_runtime_args(p: argparse.ArgumentParser, *, stage: bool = False) -> None:
    """--runtime and the simulated runtime's flags; ``stage``: for ``cvserve worker`` (the
    DNNs of one pipeline stage: no copy time, no GPU flags)."""
    from cvserve.config import RUNTIMES
    from cvserve.runtime.simulated import packaged_profiles

    p.add_argument(
        "--runtime", default="onnxruntime", choices=RUNTIMES,
        help="onnxruntime (default); torch: the model's torch.export program (.pt2: "
        "`cvserve models build NAME --pt2`, or `models add FILE.pt2`); or simulated: an "
        "accelerator that takes --sim-profile's "
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
    from cvserve.runtime.torchrt import PRECISIONS

    p.add_argument(
        "--torch-compile", action="store_true",
        help="--runtime torch: torch.compile the program (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--channels-last", action="store_true",
        help="--runtime torch: channels-last memory format (default: off)",
    )  # fmt: skip
    p.add_argument(
        "--precision", default="fp32", choices=PRECISIONS,
        help="--runtime torch on a GPU: autocast to fp16 or bf16 (default: fp32)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graphs", action="store_true",
        help="--runtime torch on a GPU: one CUDA graph per batch size bucket (default: off)",
    )  # fmt: skip


def add_cores_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pipeline-cores", type=int, default=0, metavar="N",
        help="cores a pipeline's DNN calls share in this process: a call that is alone "
        "runs on all of them, the others on one each (0: all this process may use; -1: "
        "no budget, every session takes onnxruntime's threads)",
    )  # fmt: skip


def _cmd_serve(args: argparse.Namespace) -> int:
    from cvserve.config import server_config_from_args
    from cvserve.serving.server import run_server

    cfg = server_config_from_args(args)
    if args.worker_index is not None:
        return _serve_as_replica(args, cfg)
    names = [m.name for m in cfg.models] + [p.name for p in cfg.pipelines]
    procs = f" in {cfg.workers} processes" if cfg.workers > 1 else ""
    say(f"cvserve {__version__}: serving {', '.join(names)}{procs}")
    reread = (lambda: server_config_from_args(args)) if args.config else None
    if cfg.workers > 1:
        from cvserve.serving.replicas import run_replicas

        return run_replicas(cfg, on_ready=lambda url: say(f"ready on {url}"),
                            verbose=args.verbose, reread=reread)  # fmt: skip
    run_server(cfg, progress=say, on_ready=lambda url: say(f"ready on {url}"), reread=reread)
    return 0


def _serve_as_replica(args: argparse.Namespace, cfg) -> int:
    """One process of ``serve --workers N`` (its parent made ``cfg``): say "ready" on the
    parent's pipe, count metrics in the parent's multiprocess directory."""
    from cvserve.serving.replicas import die_with_parent, metrics_dir
    from cvserve.serving.server import run_server

    die_with_parent()
    ready = os.fdopen(args.ready_fd, "w", buffering=1) if args.ready_fd is not None else None

    def on_ready(url: str) -> None:
        if ready is not None:
            ready.write(url + "\n")  # the parent says "ready on" once every process is

    run_server(cfg, progress=say, on_ready=on_ready, metrics_dir=metrics_dir(),
               own_metrics_port=False)  # fmt: skip
    return 0
