"""The study's report: CSV tables, PNG and SVG plots, and one self-contained HTML page.

``write_bench_page`` is the same page for one bench result (``cvserve demo``).
``write_report(OUT)`` reads every ``OUT/<experiment>.json`` and writes ``OUT/csv/``,
``OUT/plots/`` and ``OUT/report.html``. The page needs nothing but itself: plots are
inlined as base64 PNG, the style sheet is inline, and there is no script. Each experiment's
section opens with its findings (computed by the study, only rendered here), then its
plots beside what the paper reported, its points and the command that reruns it. Anything
that involves simulated inference carries a SIMULATED badge wherever it is shown.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
import shlex
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cvserve.bench.results import BenchResult
from cvserve.study.csv_table import write_csv
from cvserve.study.plots import Plot, plot_experiment
from cvserve.study.report_style import CSS
from cvserve.study.results import (
    EXPERIMENTS,
    ExperimentResult,
    StudyResultError,
    experiment_path,
    load_experiment,
)

__all__ = ["DEFAULT_TITLE", "SIMULATED_NOTE", "write_bench_page", "write_report"]

log = logging.getLogger(__name__)

DEFAULT_TITLE = "cvserve study: where the time goes in a vision server"
SIMULATED_NOTE = (
    "SIMULATED accelerator: inference times come from a latency profile, "
    "not from running the model."
)
PAPER = (
    "AbouElhamayed et al., \u201cBeyond Inference: Performance Analysis of DNN Server "
    "Overheads for Computer Vision\u201d, DAC 2024"
)
#: Section titles of experiments that have no result yet.
_TITLES = {
    "setups": "Server setups, from baseline to optimized",
    "models": "Models and tasks",
    "concurrency": "Concurrency and queueing",
    "image-sizes": "Image sizes and preprocessing",
    "broker": "Multi-DNN pipelines and the broker",
    "accelerator": "A faster accelerator (simulated)",
}
#: How to run one experiment alone, when its result (which carries its command) is absent.
RUN_ONE = "cvserve study --only {experiment}"
#: The metrics each experiment's table shows (any that no point has are left out).
_TABLE_METRICS = {
    "setups": ("throughput_rps", "mean_ms", "p50_ms", "p99_ms", "errors"),
    "models": ("throughput_rps", "mean_ms", "p99_ms", "infer_share_pct"),
    "concurrency": ("throughput_rps", "mean_ms", "p99_ms", "queue_ms", "queue_share_pct"),
    "image-sizes": (
        "throughput_rps",
        "mean_ms",
        "preprocess_ms",
        "preprocess_share_pct",
        "throughput_lost_pct",
    ),
    "broker": ("throughput_rps", "items_per_s", "mean_ms", "broker_ms", "broker_share_pct"),
    "accelerator": (
        "throughput_rps",
        "inference_alone_rps",
        "e2e_vs_inference_pct",
        "mean_ms",
        "p99_ms",
    ),
}
_HEADS = {
    "throughput_rps": "req/s",
    "items_per_s": "items/s",
    "inference_alone_rps": "inference alone req/s",
    "e2e_vs_inference_pct": "% of inference alone",
    "mean_ms": "mean ms",
    "p50_ms": "p50 ms",
    "p99_ms": "p99 ms",
    "queue_ms": "queueing ms",
    "queue_share_pct": "queueing %",
    "infer_share_pct": "inference %",
    "preprocess_ms": "preprocess ms",
    "preprocess_share_pct": "preprocess %",
    "throughput_lost_pct": "throughput lost %",
    "broker_ms": "broker ms",
    "broker_share_pct": "broker %",
}
_DERIVED = {
    "x_baseline": "Throughput relative to the baseline (x)",
    "dnn_alone_rps": "The DNN alone, without a server (req/s)",
    "cpu_ms_per_image": "Host CPU ms of preprocessing per image",
    "cores_per_1000_rps": "Host cores of preprocessing per 1000 req/s",
    "cores_needed": "Host cores of preprocessing needed to keep up with the accelerator",
    "saturation_concurrency": "Concurrency where throughput first reaches 90% of its peak",
    "peak_rps": "Peak throughput (req/s)",
    "dnn_alone_batch": "Batch size of the DNN-alone throughput",
    "dnn_alone_profile": "DNN latency per batch size, alone (ms)",
    "stage_b_items_per_s": "Most crops per second stage B classified",
    "profiles": "Simulated accelerator profiles",
}


# --- plots ------------------------------------------------------------------------------
def _save_plots(result: ExperimentResult, plot_dir: Path) -> tuple[list[tuple[Plot, bytes]], str]:
    """Draw and save an experiment's plots; returns (plot, PNG bytes) pairs and any error."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    for old in [*plot_dir.glob(f"{result.experiment}.*"), *plot_dir.glob(f"{result.experiment}-*")]:
        if old.suffix in (".png", ".svg"):
            old.unlink()  # a plot this run no longer draws must not linger beside the new ones
    try:
        plots = plot_experiment(result)
    except Exception as e:  # one odd result must not cost the whole report
        log.warning("cannot draw the plots of %s", result.experiment, exc_info=True)
        return [], f"{type(e).__name__}: {e}"
    drawn = []
    for plot in plots:
        buf = io.BytesIO()
        plot.figure.savefig(buf, format="png")
        png = buf.getvalue()
        (plot_dir / f"{plot.name}.png").write_bytes(png)
        plot.figure.savefig(plot_dir / f"{plot.name}.svg", format="svg", metadata={"Date": None})
        drawn.append((plot, png))
    return drawn, ""


# --- HTML -------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Text for an element's content (quotes stay as they are, as a reader sees them)."""
    return html.escape(str(value), quote=False)


def _a(value: Any) -> str:
    """Text for an attribute value."""
    return html.escape(str(value), quote=True)


def _badge(kind: str, text: str) -> str:
    return f'<span class="badge {_a(kind)}">{_e(text)}</span>'


def _sim_badge(simulated: bool) -> str:
    return _badge("sim", "SIMULATED") if simulated else ""


def _fmt(value: Any) -> str:
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # nan
            return "\u2013"
        a = abs(value)
        if a >= 100 or a == 0:
            return f"{value:,.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "0"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2013"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def _command(command: Sequence[str] | str) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _machine(machine: dict[str, Any]) -> str:
    parts = [str(machine.get("cpu_model") or "unknown CPU")]
    cores, usable = machine.get("cores"), machine.get("usable_cores")
    if cores:
        parts.append(
            f"{cores} cores" + (f" ({usable} usable)" if usable and usable != cores else "")
        )
    mem = machine.get("memory_bytes")
    if isinstance(mem, int | float) and mem > 0:
        parts.append(f"{mem / 2**30:.0f} GiB memory")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return ", ".join(parts)


def _header(
    title: str,
    results: dict[str, ExperimentResult],
    problems: dict[str, str],
    run_info: dict[str, Any],
) -> str:
    done = list(results.values())
    machine = done[0].machine if done else {}
    started = run_info.get("started") or (min(r.created for r in done) if done else None)
    profiles = sorted({r.profile for r in done})
    profile = run_info.get("profile") or (", ".join(profiles) if profiles else None)
    elapsed = run_info.get("elapsed_s")
    total = (
        _duration(elapsed)
        if elapsed is not None
        else (
            f"{_duration(sum(r.elapsed_s for r in done))} (sum of the experiments)"
            if done
            else None
        )
    )
    command = run_info.get("command") or "cvserve study" + (
        " --quick" if profile == "quick" else ""
    )
    simulated = [r.title for r in done if r.simulated]
    rows = [
        ("Machine", _e(_machine(machine)) if machine else "\u2013"),
        ("Date", _e(started or "\u2013")),
        ("Profile", _e(profile or "\u2013")),
        ("Total time", _e(total or "\u2013")),
        ("Reproduce", f"<code>{_e(_command(command))}</code>"),
    ]
    if simulated:
        rows.append(("Simulated", _sim_badge(True) + " " + _e("; ".join(simulated))))
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    toc = []
    for name in EXPERIMENTS:
        r = results.get(name)
        if r is not None:
            mark = _sim_badge(r.simulated)
            label = r.title
        else:
            mark = _badge("notrun", "unreadable" if name in problems else "not run")
            label = _TITLES.get(name, name)
        toc.append(f'<li><a href="#exp-{_a(name)}">{_e(label)}</a>{mark}</li>')
    return (
        f"<header><h1>{_e(title)}</h1>"
        f'<p class="sub">Reruns the experiments of {_e(PAPER)} on this machine.</p>'
        f'<dl class="meta">{meta}</dl><nav><ol>{"".join(toc)}</ol></nav></header>'
    )


def _findings(result: ExperimentResult) -> str:
    if not result.findings:
        return (
            '<div class="findings"><p class="none">No finding: too few points were '
            "measured to compute one.</p></div>"
        )
    return (
        '<div class="findings">'
        + "".join(
            f'<p class="finding" id="finding-{_a(f.id)}">{_e(f.text)}</p>' for f in result.findings
        )
        + "</div>"
    )


def _paper(result: ExperimentResult) -> str:
    paper = result.paper or {}
    if not paper:
        return ""
    parts = ["<h3>In the paper</h3>"]
    if paper.get("figure"):
        parts.append(f'<p class="figure">{_e(paper["figure"])}</p>')
    if paper.get("claim"):
        parts.append(f"<p>{_e(paper['claim'])}</p>")
    for key, value in paper.items():
        if key not in ("figure", "claim"):
            parts.append(f"<p><b>{_e(key)}:</b> {_e(value)}</p>")
    parts.append(
        f'<p class="small">{_e(PAPER)}. The paper\u2019s figures are not reproduced '
        "here; its numbers are quoted as text.</p>"
    )
    return f'<aside class="paper">{"".join(parts)}</aside>'


def _figures(result: ExperimentResult, drawn: list[tuple[Plot, bytes]], error: str) -> str:
    if error:
        return f'<p class="error">Could not draw the plots: {_e(error)}</p>'
    if not drawn:
        return '<p class="none">No measured points to plot.</p>'
    out = []
    for plot, png in drawn:
        data = base64.b64encode(png).decode("ascii")
        out.append(
            f'<figure><img alt="{_a(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(plot.title)}{_sim_badge(plot.simulated)} "
            f'(<a href="plots/{_a(plot.name)}.svg">SVG</a>, '
            f'<a href="plots/{_a(plot.name)}.png">PNG</a>)</figcaption></figure>'
        )
    return "".join(out)


def _points_table(result: ExperimentResult) -> str:
    points = result.points
    if not points:
        return '<p class="none">No points.</p>'
    labels = list(dict.fromkeys(k for p in points for k in p.labels))
    wanted = _TABLE_METRICS.get(result.experiment, ("throughput_rps", "mean_ms", "p99_ms"))
    metrics = [m for m in wanted if any(m in p.metrics for p in points)]
    sim = result.simulated
    head = ["status", *labels, *(_HEADS.get(m, m) for m in metrics)]
    rows = []
    for p in points:
        status = _e(p.status) if p.status == "ok" else _badge(p.status, p.status.upper())
        cells = [f"<td>{status}{_sim_badge(p.simulated)}</td>"]
        cells += [f"<td>{_e(_fmt(p.labels.get(k)))}</td>" for k in labels]
        if p.status == "ok":
            cells += [f'<td class="num">{_e(_fmt(p.metrics.get(m)))}</td>' for m in metrics]
        elif metrics:
            cells.append(
                f'<td class="reason" colspan="{len(metrics)}">'
                f"{_e(p.reason or 'no reason given')}</td>"
            )
        rows.append(f'<tr class="{_a(p.status)}">{"".join(cells)}</tr>')
    n_ok = sum(p.status == "ok" for p in points)
    caption = f"Points ({n_ok} of {len(points)} measured){_sim_badge(sim)}"
    return (
        f'<div class="tablewrap"><table class="points"><caption>{caption}</caption><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="num">{_e(_fmt(value))}</td>' if numeric else f"<td>{_e(_fmt(value))}</td>"


def _derived_table(name: str, value: Any, simulated: bool) -> str:
    caption = f"{_e(_DERIVED.get(name, name.replace('_', ' ')))}{_sim_badge(simulated)}"
    if not isinstance(value, dict):
        return f"<p><b>{caption}:</b> {_e(_fmt(value))}</p>"

    def nested(v: Any) -> bool:
        return isinstance(v, dict) and bool(v)

    rows: list[tuple[str, dict[str, Any]]] = []
    if value and all(nested(v) for v in value.values()):
        for outer, inner in value.items():
            if all(nested(v) for v in inner.values()):
                rows += [(f"{outer} \u00b7 {mid}", leaf) for mid, leaf in inner.items()]
            else:
                rows.append((str(outer), inner))
        cols = list(dict.fromkeys(k for _, r in rows for k in r))
        head = "<th></th>" + "".join(f"<th>{_e(c)}</th>" for c in cols)
        body = "".join(
            f"<tr><td>{_e(k)}</td>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>"
            for k, r in rows
        )
    else:
        head = "<th></th><th>value</th>"
        body = "".join(f"<tr><td>{_e(k)}</td>{_cell(v)}</tr>" for k, v in value.items())
    return (
        f'<div class="tablewrap"><table class="derived"><caption>{caption}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _section(result: ExperimentResult, drawn: list[tuple[Plot, bytes]], error: str) -> str:
    sim = result.simulated
    parts = [f"<h2>{_e(result.title)}{_sim_badge(sim)}</h2>"]
    if sim:
        parts.append(f'<div class="simulated-banner">{_e(SIMULATED_NOTE)}</div>')
    parts.append(_findings(result))
    parts.append(
        f'<div class="evidence"><div class="plots">{_figures(result, drawn, error)}</div>'
        f"{_paper(result)}</div>"
    )
    parts.append(_points_table(result))
    if result.derived:
        parts.append("<h3>Derived numbers</h3>")
        parts += [_derived_table(k, v, sim) for k, v in result.derived.items()]
    parts.append("<h3>Reproduce</h3>")
    parts.append(f"<pre><code>{_e(_command(result.command))}</code></pre>")
    parts.append(
        f'<p class="small">Ran in {_e(_duration(result.elapsed_s))} with the '
        f"{_e(result.profile)} profile, {_e(result.created)}. "
        f'Every point: <a href="csv/{_a(result.experiment)}.csv">csv/{_e(result.experiment)}.csv</a>'
        f"; the result: {_e(result.experiment)}.json.</p>"
    )
    return (
        f'<section id="exp-{_a(result.experiment)}" class="experiment">{"".join(parts)}</section>'
    )


def _missing_section(name: str, problem: str, run_info: dict[str, Any]) -> str:
    command = (run_info.get("commands") or {}).get(name) or RUN_ONE.format(experiment=name)
    state = "unreadable" if problem else "not run"
    why = (
        f'<p class="error">Its result could not be read: {_e(problem)}</p>'
        if problem
        else "<p>This experiment has not been run.</p>"
    )
    return (
        f'<section id="exp-{_a(name)}" class="experiment missing">'
        f"<h2>{_e(_TITLES.get(name, name))}{_badge('notrun', state)}</h2>{why}"
        f"<p>Run it with:</p><pre><code>{_e(_command(command))}</code></pre></section>"
    )


def _by_experiment(results: Iterable[ExperimentResult]) -> dict[str, ExperimentResult]:
    out: dict[str, ExperimentResult] = {}
    for r in results:
        if r.experiment in out:
            log.warning("two results for %s; the report shows the first", r.experiment)
            continue
        out[r.experiment] = r
    return out


def write_report(
    out_dir: str | os.PathLike[str],
    results: list[ExperimentResult] | None = None,
    *,
    title: str = DEFAULT_TITLE,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Write ``csv/``, ``plots/`` and ``report.html`` into ``out_dir``; returns the page.

    With ``results`` None, every ``out_dir/<experiment>.json`` present is loaded (an
    unreadable one is reported on the page, not raised). ``run_info`` describes the run for
    the header: ``command``, ``elapsed_s``, ``profile``, ``started`` (ISO time), and
    optionally ``commands`` ({experiment: command}) for experiments that did not run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_info = dict(run_info or {})
    problems: dict[str, str] = {}
    if results is None:
        loaded = []
        for name in EXPERIMENTS:
            path = experiment_path(out, name)
            if not path.exists():
                continue
            try:
                loaded.append(load_experiment(path))
            except StudyResultError as e:
                log.warning("%s", e)
                problems[name] = str(e)
        results = loaded
    by_name = _by_experiment(results)
    sections = []
    for name in EXPERIMENTS:
        result = by_name.get(name)
        if result is None:
            sections.append(_missing_section(name, problems.get(name, ""), run_info))
            continue
        write_csv(result, out / "csv" / f"{name}.csv")
        drawn, error = _save_plots(result, out / "plots")
        sections.append(_section(result, drawn, error))
    versions = next(iter(by_name.values())).machine.get("versions", {}) if by_name else {}
    body = _header(title, by_name, problems, run_info) + "".join(sections)
    return _write_page(out / "report.html", title, body, versions)


def _write_page(path: Path, title: str, body: str, versions: dict[str, Any]) -> Path:
    """The self-contained page around ``body`` (inline style, no script), written atomically."""
    footer = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        + body
        + f"<footer>Written by cvserve on {_e(time.strftime('%Y-%m-%d %H:%M'))}"
        + (f" \u00b7 {_e(footer)}" if footer else "")
        + "</footer></main></body></html>\n"
    )
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_bench_page(
    path: str | os.PathLike[str],
    result: BenchResult,
    plots: Sequence[str | os.PathLike[str]],
    *,
    title: str,
    findings: Sequence[str],
    next_steps: Sequence[tuple[str, str]] = (),
    command: str | None = None,
) -> Path:
    """One bench result as a page in the study report's style (``cvserve demo``): its
    findings, its plots inline (PNG files from :func:`cvserve.bench.report.report`), its
    points, how to reproduce it and ``next_steps`` ((what, command) pairs)."""
    path = Path(path)
    meta = [
        ("Machine", _e(_machine(result.machine)) if result.machine else "\u2013"),
        ("Date", _e(result.created or "\u2013")),
        ("Reproduce", f"<code>{_e(command or _command(result.command))}</code>"),
    ]
    parts = [
        f"<header><h1>{_e(title)}</h1>",
        '<dl class="meta">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in meta) + "</dl>",
        '</header><section class="experiment"><h2>What it found</h2>',
        '<div class="findings">'
        + "".join(f'<p class="finding">{_e(f)}</p>' for f in findings)
        + "</div>",
    ]
    figures = []
    for plot in plots:
        plot = Path(plot)
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        name = plot.stem.replace("_", " ")
        figures.append(
            f'<figure><img alt="{_a(name)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{_e(name)} (<a href="{_a(plot.name)}">PNG</a>)</figcaption></figure>'
        )
    parts.append(f'<div class="evidence"><div class="plots">{"".join(figures)}</div></div>')
    head = ["load", "req/s", "mean ms", "p50 ms", "p99 ms", "errors", "mean batch"]
    rows = []
    for pt in result.points:
        lat = pt.latency_ms
        cells = [pt.load_label, pt.throughput_rps, lat.get("mean"), lat.get("p50"),
                 lat.get("p99"), pt.errors.get("total", 0), pt.mean_batch_size]  # fmt: skip
        rows.append("<tr>" + "".join(f'<td class="num">{_e(_fmt(c))}</td>' for c in cells)
                    + "</tr>")  # fmt: skip
    parts.append(
        '<div class="tablewrap"><table class="points"><caption>Points</caption><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )
    if next_steps:
        parts.append("<h3>What to try next</h3><ul>")
        parts += [f"<li>{_e(what)}<pre><code>{_e(cmd)}</code></pre></li>"
                  for what, cmd in next_steps]  # fmt: skip
        parts.append("</ul>")
    parts.append("</section>")
    return _write_page(path, title, "".join(parts), result.machine.get("versions", {}))
