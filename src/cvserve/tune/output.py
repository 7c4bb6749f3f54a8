"""What a tuning run leaves behind: the winner as a ``cvserve serve --config`` YAML file,
and one table row per candidate (for the terminal and the state file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvserve.tune.search import Candidate, SearchResult, Settings


def config_dict(model: str, s: Settings, cache_dir: str | None = None) -> dict[str, Any]:
    """``s`` as a config file's mapping (schema: ``cvserve.config.server_config_from_dict``):
    preprocessing threads are the server's, the rest the model's."""
    server: dict[str, Any] = {"preprocess_threads": s.preprocess_threads}
    if cache_dir:
        server["cache_dir"] = str(cache_dir)
    return {
        "server": server,
        "models": [{
            "name": model,
            "max_batch_size": s.max_batch,
            "max_delay_ms": s.max_delay_ms,
            "instances": s.instances,
            "intra_op_threads": s.intra_op_threads,
            "decoder": s.decoder,
        }],
    }  # fmt: skip


def write_config(
    path: str | Path,
    model: str,
    s: Settings,
    cache_dir: str | None = None,
    header: list[str] | None = None,
) -> Path:
    """Write ``s`` as a YAML config, ``header`` lines as ``#`` comments above it."""
    import yaml

    path = Path(path)
    text = "".join(f"# {line}".rstrip() + "\n" for line in header or [])
    text += yaml.safe_dump(config_dict(model, s, cache_dir), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _fmt(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def header_lines(
    model: str, result: SearchResult, slo_p99_ms: float, info: dict[str, Any]
) -> list[str]:
    """The comment block of the winner's YAML: what was measured, where and how."""
    w, d = result.best.measurement, result.default.measurement
    lines = [
        f"cvserve tune: {model}, the highest throughput with p99 <= {slo_p99_ms:g} ms",
        f"winner: {_fmt(w.throughput_rps)} req/s at concurrency {w.concurrency}, "
        f"p99 {_fmt(w.p99_ms)} ms (SLO {slo_p99_ms:g} ms)",
    ]
    if d.meets_slo:
        lines.append(
            f"defaults: {_fmt(d.throughput_rps)} req/s at concurrency {d.concurrency}, p99 "
            f"{_fmt(d.p99_ms)} ms: the winner is {w.throughput_rps / d.throughput_rps:.2f}x"
        )
    else:
        lines.append("defaults: no concurrency met the SLO")
    lines += [
        f"measured {info['date']} on {info['cores']} cores ({info['cpu']}), cvserve "
        f"{info['version']}",
        f"images: {info['images']} ({info['n_images']} files); closed loop, "
        f"{info['point_s']:g} s a point after {info['warmup_s']:g} s warm-up, concurrency "
        f"up to {info['max_concurrency']}",
        f"{len(result.candidates)} candidates ({result.stop_reason}); table in {info['state']}",
        f"command: {info['command']}",
        "serve it: cvserve serve --config THIS_FILE",
    ]
    return lines


#: Short enough that the table fits 80 columns (the caption says what each one means).
TABLE_HEADERS = ("#", "move", "batch", "delay", "inst", "prep", "decoder", "c", "req/s",
                 "p99", "SLO", "x default")  # fmt: skip


def table_rows(result: SearchResult) -> list[dict[str, Any]]:
    """One row per candidate, in the order they were tried (JSON-friendly)."""
    base = result.default.measurement.throughput_rps
    rows = []
    for i, c in enumerate(result.candidates, 1):
        s, m = c.settings, c.measurement
        rows.append({
            "n": i, "move": c.move, **s.to_dict(), "concurrency": m.concurrency,
            "throughput_rps": m.throughput_rps, "p99_ms": m.p99_ms, "meets_slo": m.meets_slo,
            "p99_c1_ms": m.p99_c1_ms,
            "vs_default": m.throughput_rps / base if base and m.throughput_rps else None,
            "reused": c.reused, "winner": c is result.winner, "error": m.error,
        })  # fmt: skip
    return rows


def table_cells(row: dict[str, Any]) -> list[Any]:
    """A :func:`table_rows` row as the terminal table's cells (``TABLE_HEADERS``)."""
    mark = ("*" if row["winner"] else "") + ("r" if row["reused"] else "")
    slo = "yes" if row["meets_slo"] else ("error" if row["error"] else "no")
    ratio = row["vs_default"]
    p99 = row["p99_ms"]
    if p99 is None and row.get("p99_c1_ms") is not None:  # a miss: how far, at c=1
        p99 = f"({row['p99_c1_ms']:.1f})"
    return [
        f"{row['n']}{mark}", _short_move(row["move"]), row["max_batch"], f"{row['max_delay_ms']:g}",
        f"{row['instances']}x{row['intra_op_threads']}", row["preprocess_threads"],
        row["decoder"], row["concurrency"], row["throughput_rps"], p99, slo,
        "-" if ratio is None else f"{ratio:.2f}",
    ]  # fmt: skip


def _short_move(move: str) -> str:
    """``decoder opencv`` -> ``decoder`` (its column names it), ``instances`` -> ``inst``."""
    return "decoder" if move.startswith("decoder ") else move.replace("instances", "inst")


def candidate_line(c: Candidate) -> str:
    """One line per measured candidate, for the progress log."""
    m = c.measurement
    if m.error:
        what = m.error
    elif m.meets_slo:
        what = f"{m.throughput_rps:.1f} req/s, p99 {m.p99_ms:.0f} ms at c={m.concurrency}"
    else:
        what = f"misses the SLO (p99 {_fmt(m.p99_c1_ms)} ms at c=1)"
    return f"{c.move}: {c.settings.label()} -> {what}" + (" (reused)" if c.reused else "")
