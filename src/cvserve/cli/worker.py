"""``cvserve worker`` (one pipeline stage from a broker) and ``cvserve broker``."""

from __future__ import annotations

import argparse
import os

from cvserve.cli._common import add_cache_arg, add_renamed, say
from cvserve.cli.serve import add_cores_arg, add_runtime_args, add_trace_args


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve one pipeline stage from a broker (scale a stage out across processes)",
    )
    p.add_argument("--pipeline", required=True, help="pipeline name as served (e.g. ocr)")
    p.add_argument("--kind", help="pipeline kind (default: the pipeline's name)")
    p.add_argument(
        "--config", metavar="FILE",
        help="the server's config file: its pipeline --pipeline, steps and settings as "
        "served (default: none; the pipeline is the preset --kind with these flags)",
    )  # fmt: skip
    p.add_argument(
        "--stage", required=True,
        help="the step to serve: one with via: broker (ocr: rec; detect-classify: classify)",
    )  # fmt: skip
    p.add_argument(
        "--broker", default=os.environ.get("CVSERVE_BROKER"),
        required="CVSERVE_BROKER" not in os.environ,
        help="redis://[[user]:password@]host:port (rediss:// for TLS); default: the "
        "CVSERVE_BROKER environment variable, which keeps a password out of `ps`",
    )  # fmt: skip
    p.add_argument(
        "--instances", type=int, default=None,
        help="model instances in this process (default: the step's, else 1)",
    )  # fmt: skip
    p.add_argument(
        "--max-batch-size", type=int, default=None, metavar="N",
        help="items per batch (YAML: max_batch_size; default: the step's, else 16)",
    )  # fmt: skip
    add_renamed(p, "--max-batch", "--max-batch-size", "max_batch_size", int)
    p.add_argument(
        "--intra-op-threads", type=int, default=0, metavar="N",
        help="onnxruntime threads per instance (default 0: cores / instances)",
    )  # fmt: skip
    add_cores_arg(p)
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
    add_runtime_args(p, stage=True)
    add_trace_args(p)
    add_cache_arg(p)
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    from cvserve.config import worker_config_from_args, worker_trace_settings
    from cvserve.serving.pipelines.stage_process import run_stage_process

    cfg = worker_config_from_args(args)  # --config: that file's pipeline, flags on top
    exporter, service = worker_trace_settings(args)
    return run_stage_process(cfg, args.stage, args.broker, say=say, cache_dir=args.cache_dir,
                             trace_exporter=exporter, trace_service_name=service)  # fmt: skip


def add_broker_parser(sub: argparse._SubParsersAction) -> None:
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
    say(f"{len(letters)} dead letters ({scope}) on {where}")
    return 0
