"""Rich renderables for bench results, shared by ``cvserve bench`` and ``cvserve demo``.

The functions build tables and progress displays; printing them is the caller's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from copy import copy
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cvserve.bench.results import BenchResult, PointSummary
from cvserve.trace import STAGES

__all__ = ["ProgressReporter", "breakdown_table", "fit_table", "fmt_num", "summary_table"]

#: The terminal width every table here is laid out for.
WIDTH = 80
# One or more numbers (optionally %, or in parentheses) separated by spaces, or "-".
_NUMERIC = re.compile(r"^-$|^\(?[-+]?[\d.,]*\d%?\)?(\s+\(?[-+]?[\d.,]*\d%?\)?)*$")


def fmt_num(value: float | int | None, decimals: int = 1) -> str:
    """``value`` with fewer decimals as it grows, so a column stays narrow and no digit
    of the integer part is ever lost: ``decimals`` below 100, at most 1 below 1000, none
    from 1000 on (12345.6 -> ``12346``). ``None`` is ``-``."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    a = abs(value)
    d = 0 if a >= 999.95 else min(decimals, 1) if a >= 99.995 else decimals
    return f"{value:.{d}f}"


def _plain(cell: str) -> str:
    """What the terminal shows of ``cell`` (rich markup parsed away)."""
    return Text.from_markup(cell).plain


class _Table(Table):
    """A table whose title and caption wrap at the console's width, not the table's own.

    Rich lays a title out at the width of the table under it, so a long one (a URL with
    its port, a CPU name) over a narrow table breaks mid-phrase on any terminal. A title
    or caption wider than the table is printed as lines of its own, left-aligned.
    """

    def __rich_console__(
        self, console: Console, options: ConsoleOptions
    ) -> Iterator[RenderableType]:
        width = console.measure(self, options=options).maximum

        def too_wide(note: object) -> bool:
            return isinstance(note, str) and any(
                len(_plain(line)) > width for line in note.split("\n")
            )

        long_title, long_caption = too_wide(self.title), too_wide(self.caption)
        if not (long_title or long_caption):
            yield from super().__rich_console__(console, options)
            return
        bare = copy(self)
        if long_title:
            bare.title = None
            yield console.render_str(str(self.title), style="table.title")
        if long_caption:
            bare.caption = None
        yield bare
        if long_caption:
            yield console.render_str(str(self.caption), style="table.caption")


def fit_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    caption: str | Sequence[str] | None = None,
    width: int = WIDTH,
    decimals: int = 1,
) -> Table:
    """``rows`` as a rich table laid out to fit ``width`` columns without cutting a cell.

    Numbers (int, float, None) are formatted by :func:`fmt_num`; strings are shown as
    given (rich markup allowed). A column whose cells all look numeric is right-aligned
    and never wraps; text columns may wrap at spaces (never with ``…``). The columns are
    two spaces apart, or one where two would not fit; a table too wide even then folds
    its numbers onto more lines rather than cut them. ``caption`` (a string, or one line
    per item) goes under the table, left-aligned: the place for footnotes. Title and
    caption wrap at the terminal's width even where the table is narrower.
    """
    cells = [[fmt_num(c, decimals) if c is None or isinstance(c, int | float) else str(c)
              for c in row] for row in rows]  # fmt: skip
    ncols = len(headers)
    if any(len(r) != ncols for r in cells):
        raise ValueError(f"every row needs {ncols} cells")
    plain = [[_plain(c) for c in r] for r in cells]
    numeric = [all(_NUMERIC.match(r[i].strip() or "-") for r in plain) for i in range(ncols)]
    widest = [max([len(_plain(h)), *(len(line) for r in plain for line in r[i].split("\n"))])
              for i, h in enumerate(headers)]  # fmt: skip
    # What a column needs at the least: its widest number, or its longest word.
    least = [
        w if numeric[i] else max(len(x) for c in [headers[i], *(r[i] for r in plain)]
                                 for x in [*_plain(c).split(), ""])
        for i, w in enumerate(widest)
    ]  # fmt: skip
    # Two spaces between columns, one if that is what it takes to fit; past that, even
    # numbers fold onto a second line (rich would otherwise crop whole columns off).
    gap = 2 if sum(least) + 2 * (ncols - 1) <= width else 1
    fits = sum(least) + gap * (ncols - 1) <= width
    table = _Table(
        title=title,
        caption="\n".join(caption) if isinstance(caption, list | tuple) else caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, gap - 1),
        collapse_padding=True,
    )
    for i, h in enumerate(headers):
        if numeric[i] and fits:
            table.add_column(h, justify="right", no_wrap=True, min_width=widest[i])
        elif numeric[i]:
            table.add_column(h, justify="right", overflow="fold")
        else:
            table.add_column(h, overflow="fold")
    for r in cells:
        table.add_row(*r)
    return table


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
    left to the JSON; the errors column counts them and a footnote line per point says
    which (status codes, kinds), as it does for open-loop arrivals the client dropped;
    the stability column shows only when a point used the stop rule.
    """
    points = _points(result)
    if title is None and isinstance(result, BenchResult):
        cfg = result.config
        protocol = cfg.get("protocol") or "v1"
        where = cfg.get("url")
        if protocol == "v2-grpc" and cfg.get("grpc_target"):
            where = f"grpc://{cfg['grpc_target']}"
        if protocol != "v1":
            where = f"{where} ({protocol}{', input tensor' if cfg.get('input_tensor') else ''})"
        title = escape(
            f"{cfg.get('model')} @ {where}" + (f" [{result.label}]" if result.label else "")
        )
    show_stable = any(p.stable is not None for p in points)
    headers = ["load", "req/s", "mean", "p50", "p90", "p99", "max", "batch", "queue", "errors"]
    if show_stable:
        headers.append("stable")
    notes = ["latencies in ms; queue = queue + batch_wait"]
    rows = []
    for p in points:
        lat = p.latency_ms
        if p.mode == "open" and p.dropped:
            notes.append(
                f"dropped at {p.load_label}: {p.dropped} arrivals (client at max in flight)"
            )
        if p.errors["total"]:
            notes.append(f"[red]errors at {p.load_label}: {_errors(p)}[/]")
        if p.retry_wait_s:  # the refused clients backed off: fewer requests in flight
            notes.append(
                f"backed off at {p.load_label}: the refused clients waited Retry-After "
                f"{fmt_num(p.retry_wait_s)} s in all (--no-retry-after: next request at "
                "once, as perf_analyzer, hey and locust do)"
            )
        row = [
            p.load_label,
            f"{p.throughput_rps:.1f}",
            *(fmt_num(lat[k]) for k in ("mean", "p50", "p90", "p99", "max")),
            "-" if p.mean_batch_size is None else fmt_num(p.mean_batch_size, 2),
            fmt_num(p.queue_ms) if p.breakdown_ms else "-",
            f"[red]{p.errors['total']}[/]" if p.errors["total"] else "0",
        ]
        if show_stable:
            row.append({True: "yes", False: "[red]no[/]", None: "-"}[p.stable])
        rows.append(row)
    return fit_table(headers, rows, title=title, caption=notes)


def breakdown_table(result: BenchResult | list[PointSummary], title: str | None = None) -> Table:
    """Where the time went: one row per stage, one column per point, ``ms pct%``.

    Six points fit an 80-column terminal with times up to 99999 ms.
    """
    points = _points(result)
    present = [s for s in STAGES if any(s in p.breakdown_ms for p in points)]
    rows: list[list[Any]] = []
    for stage in present:
        cells = [stage]
        for p in points:
            if stage in p.breakdown_ms:
                pct = p.breakdown_pct[stage]
                cells.append(f"{fmt_num(p.breakdown_ms[stage], 2)} [dim]{pct:>3.0f}%[/]")
            else:
                cells.append("-")
        rows.append(cells)
    rows.append(["[bold]end to end[/]",
                 *(f"[bold]{fmt_num(p.latency_ms['mean'], 2)}[/]" for p in points)])  # fmt: skip
    if any(p.mean_response_bytes for p in points):
        rows.append([
            "response KB",
            *(None if p.mean_response_bytes is None else p.mean_response_bytes / 1024
              for p in points),
        ])  # fmt: skip
    table = fit_table(
        ["stage", *(p.load_label for p in points)],
        rows,
        title=title or "mean time per request by stage",
        caption="ms and % of end to end",
    )
    if present:
        table.rows[len(present) - 1].end_section = True
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
