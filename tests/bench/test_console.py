"""Bench tables fit an 80-column terminal and never cut a number."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from cvserve.bench.console import breakdown_table, fit_table, fmt_num, summary_table
from cvserve.bench.results import BenchResult, PointSummary
from cvserve.trace import STAGES

ERRORS = {"total": 12, "by_status": {"429": 10}, "by_kind": {"timeout": 2}}
NO_ERRORS = {"total": 0, "by_status": {}, "by_kind": {}}


def _point(i: int, *, rate: float | None = None, conc: int = 16, lat: float = 12345.6,
           tput: float = 9999.9, dropped: int = 0, errors=None, stable=None) -> PointSummary:  # fmt: skip
    # Uneven stage times, so the percentages differ from stage to stage.
    ms = {s: lat * (1 + k % 4) / 26 for k, s in enumerate(STAGES)}
    total = sum(ms.values())
    return PointSummary(
        index=i, mode="open" if rate else "closed", concurrency=None if rate else conc,
        rate=rate, stop_reason="duration" if stable is None else "stable", stable=stable,
        started_s=0.0, measure_s=10.0, requests=100, ok=88, throughput_rps=tput,
        images_per_s=tput, request_rate_rps=tput, offered_rps=rate, dropped=dropped,
        unfinished=0, send_lag_ms=None,
        latency_ms={"mean": lat, "p50": lat * 0.9, "p90": lat * 1.01, "p99": lat * 1.02,
                    "max": lat * 1.07},
        errors=errors or NO_ERRORS, mean_batch_size=16.0, server_timing_malformed=0,
        server_timing_missing=0, breakdown_ms=ms,
        breakdown_pct={s: 100 * v / total for s, v in ms.items()}, windows=[],
        mean_response_bytes=123456.0,
    )  # fmt: skip


def _worst_case() -> list[PointSummary]:
    return [
        _point(0, conc=1),
        _point(1, conc=1024, errors=ERRORS, stable=False),
        _point(2, rate=1000.0, dropped=12345, errors=ERRORS, stable=True),
        _point(3, rate=12.5, lat=1.234, tput=3.25),
        _point(4, conc=64, lat=99.995),
        _point(5, rate=0.5, lat=999.96),
    ]


def _render(*tables) -> str:
    console = Console(width=80, record=True, file=io.StringIO())
    for t in tables:
        console.print(t)
    return console.export_text()


def _assert_fits(text: str) -> None:
    assert "…" not in text
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, max(lines, key=len)


def _row(text: str, first_cell: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(first_cell + " ")]
    return line


def test_summary_table_fits_80_columns_with_every_number_whole():
    points = _worst_case()
    text = _render(summary_table(points, title="cvserve demo: resnet50"))
    _assert_fits(text)
    for header in ("req/s", "mean", "p50", "p90", "p99", "max", "batch", "queue", "errors"):
        assert header in text
    assert "stable" in text
    row = _row(text, "c=1024")
    for cell in ("9999.9", "12346", "11111", "12469", "12593", "13210", "16.00", "12", "no"):
        assert f" {cell} " in f" {row} ", (cell, row)
    assert "3.2" in _row(text, "12.5/s") and "1.2" in _row(text, "12.5/s")
    assert " 100.0 " in _row(text, "c=64") and " 1000 " in _row(text, "0.5/s")
    # The error and drop details are footnotes, whole.
    assert "errors at c=1024: 12 (429:10, timeout:2)" in text
    assert "errors at 1000/s: 12 (429:10, timeout:2)" in text
    assert "dropped at 1000/s: 12345 arrivals" in text


@pytest.mark.parametrize("n", [1, 3, 6])
def test_breakdown_table_fits_80_columns_up_to_six_points(n):
    points = _worst_case()[:n]
    text = _render(breakdown_table(points))
    _assert_fits(text)
    for p in points:
        assert p.load_label in text
    for stage in STAGES:
        line = _row(text, stage)
        cells = [
            f"{fmt_num(p.breakdown_ms[stage], 2)} {p.breakdown_pct[stage]:>3.0f}%" for p in points
        ]
        for cell in cells:
            assert cell in line, (cell, line)
    end = _row(text, "end to end")
    for p in points:
        assert f" {fmt_num(p.latency_ms['mean'], 2)}" in end
    assert "120.6" in _row(text, "response KB")


def test_fmt_num_drops_decimals_as_numbers_grow_but_never_digits():
    assert fmt_num(None) == "-"
    assert fmt_num(7) == "7"
    assert fmt_num(1.234) == "1.2" and fmt_num(1.234, 2) == "1.23"
    assert fmt_num(123.456, 2) == "123.5"
    assert fmt_num(99.996, 2) == "100.0"  # rounds up into the next range: one decimal
    assert fmt_num(999.96) == "1000"
    assert fmt_num(12345.6) == "12346" and fmt_num(-12345.6) == "-12346"
    assert fmt_num(123456789.0) == "123456789"


def test_fit_table_aligns_numbers_wraps_text_and_fits():
    rows = [
        ["resnet50", "cvserve", 1, 22.04, 45.8, "a long note " * 8 + "that wraps, never cut"],
        ["resnet18", "baseline", 16, 9999.9, 12345.6, "short"],
        ["vit-base-patch16", "ray-serve", 256, None, 0.5, "x"],
    ]
    table = fit_table(
        ["model", "server", "c", "req/s", "p50 ms", "note"],
        rows,
        title="servers side by side",
        caption=["a footnote with 12 (429:10, timeout:2) in it", "and another"],
    )
    text = _render(table)
    _assert_fits(text)
    words = " ".join(text.split())
    assert "a long note " * 8 + "that wraps, never cut" in words
    line = _row(text, "resnet18")
    for cell in ("baseline", "16", "10000", "12346"):  # 9999.9 and 12345.6, no decimals
        assert f" {cell} " in f" {line} "
    # numbers are right-aligned: they end in the same column
    lines = [_row(text, m) for m in ("resnet50", "resnet18", "vit-base-patch16")]
    cells = (" 22.0 ", " 10000 ", " - ")
    ends = {ln.index(v) + len(v) for ln, v in zip(lines, cells, strict=True)}
    assert len(ends) == 1
    assert "a footnote with 12 (429:10, timeout:2) in it" in text and "and another" in text
    with pytest.raises(ValueError, match="6 cells"):
        fit_table(["a", "b", "c", "d", "e", "f"], [[1, 2]])


def test_fit_table_too_wide_even_one_space_apart_folds_rather_than_cuts():
    values = [f"{10000 + i:.1f}" for i in range(11)]  # 11 x 7 characters + 10 spaces > 80
    text = _render(fit_table([f"c{i}" for i in range(11)], [values]))
    _assert_fits(text)
    assert all(f"c{i}" in text for i in range(11))  # no column cropped off
    digits = "".join(ch for ch in text if ch.isdigit() or ch == ".")
    for v in values:
        assert v[:5] in digits


def _grpc_result(target: str) -> BenchResult:
    return BenchResult(
        command=[], machine={}, server={},
        config={"model": "tiny-resnet", "protocol": "v2-grpc", "input_tensor": True,
                "url": "http://127.0.0.1:8000", "grpc_target": target},
        points=[_point(0, conc=2, lat=1.5, tput=12.5)],
    )  # fmt: skip


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:65535", "a-very-long-hostname-of-the-machine.cluster.example.internal:65535"],
)
def test_a_title_wider_than_its_table_wraps_at_the_terminal_not_the_table(target):
    table = summary_table(_grpc_result(target))
    text = _render(table)
    _assert_fits(text)
    title = f"tiny-resnet @ grpc://{target} (v2-grpc, input tensor)"
    # At 80 columns, a title that fits is one line; a longer one wraps at spaces only.
    lines = [line.rstrip() for line in text.splitlines()]
    if len(title) <= 80:
        assert title in lines
    else:
        assert title in " ".join(" ".join(lines).split()) and f"grpc://{target}" in text
    # the footnote likewise stays on one line over a narrow table
    assert "latencies in ms; queue = queue + batch_wait" in lines
