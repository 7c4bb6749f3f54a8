"""``cvserve demo``: build a model, serve it, load it, explain where time went."""

from __future__ import annotations

import argparse

from cvserve.cli._common import add_cache_arg, csv_ints, say


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="build a model, serve it, load it with real images, explain where time went",
        description="Builds a model (random weights), serves it, loads it at a few "
        "concurrencies, prints where the time went, writes plots and an HTML report, and "
        "says what to try next.",
    )
    p.add_argument("--model", default="resnet18", help="zoo or stored model (default resnet18)")
    p.add_argument(
        "--images", help="folder of images (default: ../shared/data/images/medium if present, "
        "else synthetic photos written to OUT/photos)",
    )  # fmt: skip
    p.add_argument(
        "--concurrency", type=csv_ints, default=[1, 4, 16],
        help="closed-loop concurrencies to measure (default 1,4,16)",
    )  # fmt: skip
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds measured per point (default 5)"
    )
    p.add_argument(
        "--serve-args", default="--max-batch-size 8 --max-delay-ms 5",
        help="extra `cvserve serve` flags for the demo server "
        "(default '--max-batch-size 8 --max-delay-ms 5')",
    )  # fmt: skip
    p.add_argument(
        "--out", default="cvserve-demo",
        help="folder for the report: result JSON, plots, report.html (default ./cvserve-demo)",
    )  # fmt: skip
    add_cache_arg(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import shlex
    import sys
    import textwrap
    import time

    from rich.console import Console

    from cvserve.bench import ProgressReporter, breakdown_table, summary_table
    from cvserve.demo import demo_images, findings, next_steps, run_demo, write_demo_report

    console = Console(stderr=False)
    t0 = time.monotonic()
    images = args.images or demo_images(args.out, say=say)
    with ProgressReporter(Console(stderr=True)) as progress:
        result = run_demo(
            model=args.model,
            images=images,
            concurrency=args.concurrency,
            duration=args.duration,
            cache_dir=args.cache_dir,
            serve_args=shlex.split(args.serve_args),
            say=say,
            progress=progress,
        )
    console.print(summary_table(result, title=f"cvserve demo: {args.model}"))
    console.print(breakdown_table(result, title="mean time per request, by stage"))
    for sentence in findings(result):
        print(textwrap.fill(sentence, 78, initial_indent="- ", subsequent_indent="  "))
    command = "cvserve " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else None
    page = write_demo_report(result, args.out, args.model, images, command)
    print(f"\nreport: {page}\n  (the plots and the result JSON are beside it)")
    print("next:")
    for what, command in next_steps(args.model, page.parent, images):
        print(textwrap.fill(what, 78, initial_indent="  ", subsequent_indent="  ") + ":")
        print(wrap_command(command, 78, indent="    "))
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


def wrap_command(command: str, width: int, indent: str = "") -> str:
    """A shell command on lines of at most ``width`` columns where its words allow,
    continued with `` \\``; quoted words stay whole."""
    import shlex

    words = [w if w in ("&&", "||", "|", ";") else shlex.quote(w) for w in shlex.split(command)]
    lines, line = [], indent
    for w in words:
        if line.strip() and len(line) + 1 + len(w) + 2 > width:
            lines.append(line + " \\")
            line = indent + "  " + w
        else:
            line = f"{line} {w}" if line.strip() else line + w
    return "\n".join([*lines, line])
