"""Measure a cvserve server over the wire: load generator, results, summaries and plots.

``run_bench(BenchConfig(...))`` sweeps closed-loop concurrencies and open-loop rates and
returns a :class:`BenchResult`; ``save_result``/``load_result`` store it (JSON schema
``cvserve.bench/1`` plus per-request rows in ``.npz``); ``summary_table`` and
``breakdown_table`` render it; ``report`` plots one or more results.
"""

from cvserve.bench.console import ProgressReporter, breakdown_table, summary_table
from cvserve.bench.inputs import BenchImage, ImageSourceError, load_images
from cvserve.bench.report import report
from cvserve.bench.results import (
    SCHEMA_VERSION,
    BenchResult,
    PointSummary,
    ResultError,
    load_result,
    save_result,
    validate,
)
from cvserve.bench.runner import (
    BenchConfig,
    BenchError,
    BenchInterrupted,
    ServerUnreachable,
    TargetNotServed,
    run_bench,
)

__all__ = [
    "SCHEMA_VERSION",
    "BenchConfig",
    "BenchError",
    "BenchImage",
    "BenchInterrupted",
    "BenchResult",
    "ImageSourceError",
    "TargetNotServed",
    "PointSummary",
    "ProgressReporter",
    "ResultError",
    "ServerUnreachable",
    "breakdown_table",
    "load_images",
    "load_result",
    "report",
    "run_bench",
    "save_result",
    "summary_table",
    "validate",
]
