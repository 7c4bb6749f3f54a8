"""``cvserve study``: the paper's experiments on this machine, and their report."""

from __future__ import annotations

import argparse
import logging
import sys

from cvserve.cli._common import add_cache_arg, say


def add_study_parser(sub: argparse._SubParsersAction) -> None:
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
        help="tiny models and short points: ~2.5 min on 2 cores (default: the full study, "
        "~10.5 min on 2 cores)",
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
    p.add_argument(
        "--pipeline", metavar="FILE",
        help="a config file whose pipelines the broker experiment also measures, over each "
        "broker, with each step's time in Server-Timing (default: only the paper's)",
    )  # fmt: skip
    add_cache_arg(p)
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
            pipelines=Path(args.pipeline) if args.pipeline else None,
        )
        try:
            with StudyProgress(Console(stderr=True)) as progress:
                results = run_study(config, progress=progress)
        except StudyError as e:
            say(f"error: {e}")
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
