"""``cvserve bench`` (measure a server) and ``cvserve report`` (plot its results)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cvserve.cli._common import add_cache_arg, add_seconds_alias, csv_floats, csv_ints, say


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
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
        help="server base URL (grpc://host:port for --protocol v2-grpc; default "
        "%(default)s)",
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
        help="send FILE's first key (read as the server reads it: blank and # lines "
        "skipped) as 'Authorization: Bearer KEY' (gRPC: metadata); default: "
        "$CVSERVE_API_KEY if set",
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
    p.add_argument("--concurrency", type=csv_ints, help="closed loop: e.g. 1,2,4,8,16,32")
    p.add_argument("--rate", type=csv_floats, help="open loop, requests/s: e.g. 20,40,80")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--duration", type=float, metavar="S",
        help="seconds measured per point (default: until three --window windows agree)",
    )  # fmt: skip
    stop.add_argument(
        "--requests", type=int, metavar="N",
        help="requests measured per point (default: see --duration)",
    )  # fmt: skip
    p.add_argument(
        "--warmup-ms", type=float, default=d.warmup * 1000, metavar="MS",
        help="load before each point is measured",
    )  # fmt: skip
    add_seconds_alias(p, "--warmup", "--warmup-ms", "warmup_ms")
    p.add_argument(
        "--window", type=float, default=d.window,
        help="stability window (s) when neither --duration nor --requests is given",
    )  # fmt: skip
    p.add_argument(
        "--tolerance", type=float, default=d.tolerance,
        help="three consecutive windows within this fraction = stable",
    )  # fmt: skip
    p.add_argument("--max-duration", type=float, default=d.max_duration, help="cap per point (s)")
    p.add_argument(
        "--timeout-ms", type=float, default=d.timeout * 1000, metavar="MS",
        help=f"per-request timeout (default {d.timeout * 1000:g})",
    )  # fmt: skip
    add_seconds_alias(p, "--timeout", "--timeout-ms", "timeout_ms")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the open-loop arrivals")
    p.add_argument(
        "--max-in-flight", type=int, default=d.max_in_flight, metavar="N",
        help="open loop: arrivals still unanswered at once; more are dropped and counted",
    )  # fmt: skip
    p.add_argument(
        "--no-retry-after", action="store_true",
        help="after a 429, send the next request at once, as perf_analyzer, hey and locust "
        "do (default: wait its Retry-After)",
    )  # fmt: skip
    p.add_argument(
        "--ready-timeout-ms", type=float, default=d.ready_timeout * 1000, metavar="MS",
        help="wait this long for /readyz before giving up",
    )  # fmt: skip
    add_seconds_alias(p, "--ready-timeout", "--ready-timeout-ms", "ready_timeout_ms")
    p.add_argument("--label", help="name of this run in reports")
    p.add_argument(
        "--out", metavar="FILE.json",
        help="write the result here (JSON, per-request rows in .npz), after every point",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="keep the points an interrupted run left in --out; measure only the rest",
    )  # fmt: skip
    p.add_argument(
        "--inprocess", action="store_true",
        help="start `cvserve serve` with --serve-args for this run, then stop it",
    )  # fmt: skip
    p.add_argument(
        "--serve-args", default="",
        help="flags for the --inprocess server, e.g. '--max-batch-size 8 --max-delay-ms 5'",
    )  # fmt: skip
    add_cache_arg(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import contextlib
    import shlex

    from rich.console import Console

    from cvserve.bench import (
        BenchConfig,
        BenchError,
        BenchInterrupted,
        ImageSourceError,
        ProgressReporter,
        breakdown_table,
        load_result,
        run_bench,
        save_result,
        summary_table,
    )

    api_key = _bench_api_key(args.api_key_file)
    prior = None
    if args.resume:
        if not args.out:
            say("error: --resume needs --out (the result of the run to resume)")
            return 2
        if Path(args.out).exists():
            prior = load_result(args.out)
            say(f"resuming {args.out}: {len(prior.points)} points measured already")
    server = contextlib.nullcontext()
    url = args.url
    if args.inprocess:
        from cvserve.serving.process import ServerProcess, free_port

        what = ["--pipeline", args.pipeline] if args.pipeline else ["--model", args.model]
        serve = [*what, *shlex.split(args.serve_args)]
        if args.cache_dir:
            serve += ["--cache-dir", args.cache_dir]
        if args.protocol == "v2-grpc" and "--grpc-port" not in serve:
            serve += ["--grpc-port", str(free_port())]
        say(f"starting cvserve serve {' '.join(serve)}")
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
                warmup=args.warmup_ms / 1000,
                window=args.window,
                tolerance=args.tolerance,
                max_duration=args.max_duration,
                timeout=args.timeout_ms / 1000,
                seed=args.seed,
                max_in_flight=args.max_in_flight,
                honor_retry_after=not args.no_retry_after,
                ready_timeout=args.ready_timeout_ms / 1000,
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
            save = (lambda r: save_result(r, args.out)) if args.out else None
            with ProgressReporter(Console(stderr=True)) as progress:
                result = run_bench(
                    config, progress=progress, command=sys.argv, resume=prior, on_point=save
                )
    except BenchInterrupted as e:
        return _interrupted(e.result, args.out)
    except (BenchError, ImageSourceError) as e:
        say(f"error: {e}")
        return 2
    console = Console()
    console.print(summary_table(result))
    console.print(breakdown_table(result))
    if args.out:
        say(f"wrote {save_result(result, args.out)}")
    return _all_failed(result)


def _interrupted(result, out: str | None) -> int:  # noqa: ANN001
    """Ctrl-C: keep the finished points (in --out, else bench-partial.json), say where and
    how to go on; exit 130."""
    from rich.console import Console

    from cvserve.bench import save_result, summary_table

    if result is None:
        say("interrupted before any point finished: nothing to keep")
        return 130
    Console().print(summary_table(result))
    path = save_result(result, out or "bench-partial.json")
    say(f"interrupted: kept {len(result.points)} finished points in {path}; the same command "
        f"with --resume --out {path} measures the rest")  # fmt: skip
    return 130


def _all_failed(result) -> int:  # noqa: ANN001
    """1 when every measured request failed (a wrong key: every one a 403), else 0."""
    requests = sum(p.requests for p in result.points)
    if requests == 0 or any(p.ok for p in result.points):
        return 0
    statuses: dict[str, int] = {}
    for p in result.points:
        for status, n in p.errors["by_status"].items():
            statuses[status] = statuses.get(status, 0) + n
        for kind, n in p.errors["by_kind"].items():
            statuses[kind] = statuses.get(kind, 0) + n
    seen = ", ".join(f"{k} x{n}" for k, n in sorted(statuses.items(), key=lambda kv: -kv[1]))
    say(f"error: every one of {requests} requests failed ({seen})")
    return 1


def _bench_api_key(path: str | None) -> str | None:
    """The bench's API key: ``path``'s first key, the file read exactly as the server reads
    it (``#`` comments and blank lines skipped), else $CVSERVE_API_KEY."""
    if path is None:
        return os.environ.get("CVSERVE_API_KEY") or None
    from cvserve.serving.auth import read_key_file

    return read_key_file(path)[0]


def add_report_parser(sub: argparse._SubParsersAction) -> None:
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
        say(f"error: {e}")
        return 2
    for path in paths:
        print(path)
    return 0
