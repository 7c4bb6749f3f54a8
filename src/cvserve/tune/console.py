"""Rich renderables for ``cvserve tune``: a progress display and the candidates' table.
Printing them is the caller's business."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from cvserve.bench.console import fit_table
from cvserve.tune.output import TABLE_HEADERS, candidate_line, table_cells


class _TimeLeft(ProgressColumn):
    """Seconds left of the budget, counted down between events."""

    def render(self, task: Any) -> Text:
        deadline = task.fields.get("deadline")
        if deadline is None:
            return Text("")
        left = max(0.0, deadline - time.monotonic())
        return Text(f"{int(left // 60)}:{int(left % 60):02d} left", style="progress.remaining")


class TuneProgress:
    """One bar over the time budget: candidates done, the best so far, time left; a log
    line per candidate above it."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.fields[done]} done"),
            BarColumn(bar_width=16),
            _TimeLeft(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task = self.progress.add_task("measuring the defaults", total=1.0, done=0,
                                           deadline=None)  # fmt: skip
        self.best = "best: -"
        self.current = ""

    def __enter__(self) -> TuneProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _show(self) -> None:
        self.progress.update(self.task, description=f"{self.best} | {self.current}")

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "message":
            self.progress.console.print(f"[dim]{event['message']}[/]")
            return
        if "time_left_s" in event:
            budget, left = event["budget_s"], event["time_left_s"]
            self.progress.update(
                self.task, total=max(budget, 1e-9), completed=min(budget, budget - left),
                done=event["done"], deadline=time.monotonic() + max(left, 0.0),
            )  # fmt: skip
            best = event.get("best")
            if best is not None and best.meets_slo:
                self.best = f"best {best.throughput_rps:.1f} req/s p99 {best.p99_ms:.0f} ms"
            elif best is not None:
                self.best = "best: none meets the SLO yet"
        if kind == "candidate":
            self.current = f"{event['move']}: {event['settings'].label()}"
        elif kind == "point":
            self.current = self.current.split(" @ ")[0] + f" @ c={event['concurrency']}"
        elif kind == "done":
            self.progress.console.print(candidate_line(event["candidate"]), highlight=False)
            self.current = ""
        self._show()


def candidates_table(rows: list[dict[str, Any]], slo_p99_ms: float, title: str) -> Table:
    """Every candidate tried: settings, its best point under the SLO, the gain."""
    return fit_table(
        TABLE_HEADERS,
        [table_cells(r) for r in rows],
        title=title,
        caption=[
            f"c: the concurrency of the best point with p99 <= {slo_p99_ms:g} ms and no "
            "errors; req/s, p99: that point's; (p99): at c=1, of a candidate that met the SLO "
            "nowhere.",
            "delay, p99: ms; inst: instances x intra-op threads; prep: preprocessing threads.",
            "x default: throughput / the defaults' (row 1); * the winner; r reused from the "
            "state file.",
        ],
    )
