"""Rich renderables for bench results, shared by ``cvserve bench`` and ``cvserve demo``.

The functions build tables and progress displays; printing them is the caller's business.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cvserve.bench.results import BenchResult, PointSummary
from cvserve.trace import STAGES

__all__ = ["ProgressReporter", "breakdown_table", "summary_table"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _errors(p: PointSummary) -> str:
    if not p.errors["total"]:
        return "0"
    parts = [f"{k}:{v}" for k, v in p.errors["by_status"].items()]
    parts += [f"{k}:{v}" for k, v in p.errors["by_kind"].items()]
    return f"{p.errors['total']} ({', '.join(parts)})"


def _points(result: BenchResult | list[PointSummary]) -> list[PointSummary]:
    return result.points if isinstance(result, BenchResult) else list(result)


def summary_table(result: BenchResult | list[PointSummary], title: str | None = None) -> Table:
    """One row per point: throughput, latency percentiles (ms), errors, batch, stability.

    Fits an 80-column terminal: images/s equals req/s for one image per request and is
    left to the JSON; the stability column shows only when a point used the stop rule.
    """
    points = _points(result)
    if title is None and isinstance(result, BenchResult):
        cfg = result.config
        title = f"{cfg.get('model')} @ {cfg.get('url')}" + (
            f" [{result.label}]" if result.label else ""
        )
    show_stable = any(p.stable is not None for p in points)
    table = Table(title=title, caption="latencies in ms; queue = queue + batch_wait")
    table.add_column("load", justify="right")
    for name in ("req/s", "mean", "p50", "p90", "p99", "max", "batch", "queue", "errors"):
        table.add_column(name, justify="right")
    if show_stable:
        table.add_column("stable", justify="center")
    for p in points:
        lat = p.latency_ms
        load = p.load_label
        if p.mode == "open" and p.dropped:
            load += f" ({p.dropped} dropped)"
        row = [
            load,
            f"{p.throughput_rps:.1f}",
            *(_ms1(lat[k]) for k in ("mean", "p50", "p90", "p99", "max")),
            "-" if p.mean_batch_size is None else f"{p.mean_batch_size:.2f}",
            _ms1(p.queue_ms) if p.breakdown_ms else "-",
            _errors(p) if not p.errors["total"] else f"[red]{_errors(p)}[/]",
        ]
        if show_stable:
            row.append({True: "yes", False: "[red]no[/]", None: "-"}[p.stable])
        table.add_row(*row)
    return table


def _ms1(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def breakdown_table(result: BenchResult | list[PointSummary], title: str | None = None) -> Table:
    """Where the time went: one row per stage, one column per point, ``ms (%)``."""
    points = _points(result)
    table = Table(title=title or "mean time per request by stage")
    table.add_column("stage")
    for p in points:
        table.add_column(p.load_label, justify="right")
    present = [s for s in STAGES if any(s in p.breakdown_ms for p in points)]
    for stage in present:
        cells = []
        for p in points:
            if stage in p.breakdown_ms:
                cells.append(f"{p.breakdown_ms[stage]:.2f} ({p.breakdown_pct[stage]:.0f}%)")
            else:
                cells.append("-")
        table.add_row(stage, *cells)
    table.add_section()
    table.add_row("end to end", *(_ms(p.latency_ms["mean"]) for p in points), style="bold")
    if any(p.mean_response_bytes for p in points):
        table.add_row(
            "response KB",
            *("-" if p.mean_response_bytes is None else f"{p.mean_response_bytes / 1024:.1f}"
              for p in points),
        )  # fmt: skip
    return table


class ProgressReporter:
    """A ``progress`` callback for :func:`~cvserve.bench.run_bench` drawing rich bars.

    Use as a context manager around the call; one bar per point.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}", justify="right"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self._tasks: dict[int, TaskID] = {}

    def __enter__(self) -> ProgressReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        point = event["point"]
        load = f"c={event['concurrency']}" if event["mode"] == "closed" else f"{event['rate']:g}/s"
        if point not in self._tasks:
            desc = f"point {point + 1}/{event.get('points', '?')} {load}"
            self._tasks[point] = self.progress.add_task(desc, total=None, status="")
        task = self._tasks[point]
        if event["requests_target"]:
            total, done = event["requests_target"], event["measured"]
        else:
            total, done = event["expected_seconds"], event["elapsed"]
        phase = "warmup" if event["warming_up"] else f"{event['measured']} req"
        status = f"{phase}, {event['errors']} err"
        window = event.get("window")
        if window is not None:
            p50 = "-" if window.p50_ms is None else f"{window.p50_ms:.1f} ms"
            status += f", last window {window.throughput_rps:.0f} req/s p50 {p50}"
        if event["event"] == "end":
            done = total
            status = f"done ({event['stop_reason']}), {event['errors']} err"
        self.progress.update(task, total=total, completed=min(done, total), status=status)
