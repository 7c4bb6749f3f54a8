"""``cvserve demo``: build a model, serve it, load it, print where time went."""

from __future__ import annotations

import argparse

from cvserve.cli._common import add_cache_arg, csv_ints, say


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build a model, serve it, load it with real images, print where time went",
    )
    p.add_argument("--model", default="resnet18", help="zoo or stored model (default resnet18)")
    p.add_argument(
        "--images", help="folder of images (default: ../shared/data/images/medium if present)"
    )
    p.add_argument(
        "--concurrency", type=csv_ints, default=[1, 4, 16],
        help="closed-loop concurrencies to measure (default 1,4,16)",
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    p.add_argument(
        "--serve-args", default="--max-batch-size 8 --max-delay-ms 5",
        help="extra `cvserve serve` flags for the demo server",
    )  # fmt: skip
    add_cache_arg(p)
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
            say=say,
            progress=progress,
        )
    console.print(summary_table(result, title=f"cvserve demo: {args.model}"))
    console.print(breakdown_table(result, title="mean time per request, by stage"))
    console.print(f"done in {time.monotonic() - t0:.0f} s")
    return 0
