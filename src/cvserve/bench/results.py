"""Bench results on disk: one JSON document per run (schema ``cvserve.bench/1``) and the
per-request rows in a columnar ``.npz`` beside it (loaded with ``allow_pickle=False``).

The JSON schema below is plain JSON Schema (draft 2020-12); :func:`validate` checks the
subset it uses, so validating needs no extra dependency.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.machine import machine_info

SCHEMA_VERSION = "cvserve.bench/1"

__all__ = [
    "RESULT_SCHEMA",
    "SCHEMA_VERSION",
    "BenchResult",
    "PointSummary",
    "ResultError",
    "load_result",
    "save_result",
    "validate",
]


class ResultError(ValueError):
    """A result file that cannot be read: wrong schema version, invalid, or missing rows."""


_ADDED_IN_V1 = frozenset({"mean_response_bytes", "simulated_responses", "retry_wait_s"})


@dataclass
class PointSummary:
    """One load point, summarized over its measured interval. Times in ms unless named _s."""

    index: int
    mode: str  # "closed" | "open"
    concurrency: int | None
    rate: float | None
    stop_reason: str  # "duration" | "requests" | "stable" | "max_duration"
    stable: bool | None  # None when the stop rule was not stability
    started_s: float  # from the run's start
    measure_s: float
    requests: int  # finished in the measured interval, errors included
    ok: int
    throughput_rps: float  # successful requests per second
    images_per_s: float
    request_rate_rps: float  # all finished requests per second
    offered_rps: float | None  # open loop: arrivals per second in the interval
    dropped: int  # open loop: arrivals refused by max_in_flight in the interval
    unfinished: int
    # open loop: how late the client released arrivals ({"mean", "max"}); a large value
    # means the client, not the server, fell behind (it is counted in the latencies)
    send_lag_ms: dict[str, float] | None
    latency_ms: dict[str, float | None]
    errors: dict[str, Any]  # {"total", "by_status": {"500": n}, "by_kind": {"timeout": n}}
    mean_batch_size: float | None
    server_timing_malformed: int
    server_timing_missing: int
    breakdown_ms: dict[str, float]
    breakdown_pct: dict[str, float]
    windows: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    #: Mean body size of the successful responses (moving results is data movement too).
    mean_response_bytes: float | None = None
    #: Measured successful responses whose inference ran on the simulated accelerator
    #: (``sim=1`` in Server-Timing): their ``infer`` time is a profile's, not a real DNN's.
    simulated_responses: int = 0
    #: Closed loop: seconds the clients waited on 429s' Retry-After in the measured
    #: interval (0 when not honoured): time they did not load the server.
    retry_wait_s: float = 0.0

    @property
    def load_label(self) -> str:
        if self.mode == "closed":
            return f"c={self.concurrency}"
        return f"{self.rate:g}/s"

    @property
    def queue_ms(self) -> float:
        """Time spent waiting on the server: ``queue`` + ``batch_wait``."""
        return self.breakdown_ms.get("queue", 0.0) + self.breakdown_ms.get("batch_wait", 0.0)


@dataclass
class BenchResult:
    """A whole run: what was asked, where it ran, and one summary per point."""

    command: list[str]
    config: dict[str, Any]
    machine: dict[str, Any]
    server: dict[str, Any]
    points: list[PointSummary]
    rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    created: str = ""
    label: str | None = None
    schema: str = SCHEMA_VERSION

    @property
    def simulated(self) -> bool:
        """True when any measured inference ran on the simulated accelerator, or the
        server said its model runs on one: the DNN times are a profile's, not measured."""
        if any(p.simulated_responses for p in self.points):
            return True
        models = (self.server or {}).get("models") or {}
        entries = models.get("models", []) if isinstance(models, dict) else []
        return any(
            isinstance(m, dict) and (m.get("runtime") or {}).get("simulated") is True
            for m in entries
        )

    def to_dict(self, rows_file: str | None = None) -> dict[str, Any]:
        n = len(next(iter(self.rows.values()))) if self.rows else 0
        return {
            "schema": self.schema,
            "created": self.created,
            "label": self.label,
            "simulated": self.simulated,
            "command": list(self.command),
            "config": self.config,
            "machine": self.machine,
            "server": self.server,
            "points": [asdict(p) for p in self.points],
            "rows": {"file": rows_file, "count": n, "columns": sorted(self.rows)},
        }


# --- schema ----------------------------------------------------------------------------
_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_MS = {"type": "object", "additionalProperties": _NUM}
_POINT = {
    "type": "object",
    # Fields added later within schema version 1 have defaults and are optional.
    "required": [f.name for f in fields(PointSummary) if f.name not in _ADDED_IN_V1],
    "additionalProperties": False,
    "properties": {
        "index": _INT,
        "mode": {"enum": ["closed", "open"]},
        "concurrency": {"type": ["integer", "null"], "minimum": 1},
        "rate": {"type": ["number", "null"], "minimum": 0},
        "stop_reason": {"enum": ["duration", "requests", "stable", "max_duration"]},
        "stable": {"type": ["boolean", "null"]},
        "started_s": _NUM,
        "measure_s": {"type": "number", "minimum": 0},
        "requests": _INT,
        "ok": _INT,
        "throughput_rps": {"type": "number", "minimum": 0},
        "images_per_s": {"type": "number", "minimum": 0},
        "request_rate_rps": {"type": "number", "minimum": 0},
        "offered_rps": _NUM_OR_NULL,
        "dropped": _INT,
        "unfinished": _INT,
        "send_lag_ms": {
            "type": ["object", "null"],
            "required": ["mean", "max"],
            "additionalProperties": _NUM,
        },
        "latency_ms": {
            "type": "object",
            "required": ["mean", "p50", "p90", "p99", "min", "max"],
            "additionalProperties": _NUM_OR_NULL,
        },
        "errors": {
            "type": "object",
            "required": ["total", "by_status", "by_kind"],
            "additionalProperties": False,
            "properties": {
                "total": _INT,
                "by_status": {"type": "object", "additionalProperties": _INT},
                "by_kind": {"type": "object", "additionalProperties": _INT},
            },
        },
        "mean_batch_size": _NUM_OR_NULL,
        "mean_response_bytes": _NUM_OR_NULL,
        "simulated_responses": _INT,
        "retry_wait_s": {"type": "number", "minimum": 0},
        "server_timing_malformed": _INT,
        "server_timing_missing": _INT,
        "breakdown_ms": _MS,
        "breakdown_pct": _MS,
        "windows": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["start", "seconds", "completed", "ok", "throughput_rps", "p50_ms"],
                "properties": {
                    "start": _NUM,
                    "seconds": _NUM,
                    "completed": _INT,
                    "ok": _INT,
                    "throughput_rps": _NUM,
                    "p50_ms": _NUM_OR_NULL,
                },
            },
        },
        "warnings": {"type": "array", "items": {"type": "string"}},
    },
}
RESULT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA_VERSION,
    "type": "object",
    "required": ["schema", "created", "command", "config", "machine", "server", "points", "rows"],
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "created": {"type": "string"},
        "label": {"type": ["string", "null"]},
        # optional (added within version 1): inference ran on the simulated accelerator
        "simulated": {"type": "boolean"},
        "command": {"type": "array", "items": {"type": "string"}},
        "config": {
            "type": "object",
            "required": ["url", "model", "images"],
            "properties": {
                "url": {"type": "string"},
                "model": {"type": "string"},
                "images": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "bytes", "content_type"],
                        "properties": {
                            "name": {"type": "string"},
                            "bytes": _INT,
                            "content_type": {"type": "string"},
                        },
                    },
                },
            },
        },
        "machine": {
            "type": "object",
            "required": ["cpu_model", "cores", "memory_bytes", "python", "versions"],
            "properties": {
                "cpu_model": {"type": "string"},
                "cores": {"type": "integer", "minimum": 1},
                "memory_bytes": {"type": ["integer", "null"]},
                "python": {"type": "string"},
                "versions": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "null"]},
                },
            },
        },
        "server": {"type": "object"},
        "points": {"type": "array", "items": _POINT},
        "rows": {
            "type": "object",
            "required": ["file", "count", "columns"],
            "properties": {
                "file": {"type": ["string", "null"]},
                "count": _INT,
                "columns": {"type": "array", "items": {"type": "string"}},
            },
        },
    },
}

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(doc: Any, schema: dict[str, Any] = RESULT_SCHEMA, path: str = "$") -> list[str]:
    """Check ``doc`` against the JSON Schema subset used here (type, const, enum,
    required, properties, additionalProperties, items, minimum); returns the problems."""
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_type(doc, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}, got {type(doc).__name__}"]
    if "const" in schema and doc != schema["const"]:
        problems.append(f"{path}: expected {schema['const']!r}, got {doc!r}")
    if "enum" in schema and doc not in schema["enum"]:
        problems.append(f"{path}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(doc, "number") and doc < schema["minimum"]:
        problems.append(f"{path}: {doc} is below the minimum {schema['minimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", ()):
            if key not in doc:
                problems.append(f"{path}: missing {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                problems += validate(value, props[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{path}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            problems += validate(item, schema["items"], f"{path}[{i}]")
    return problems


# --- files -----------------------------------------------------------------------------
def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for result documents: numpy scalars, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result")


def save_result(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Write ``path`` (JSON, ``.json`` added if missing) and its rows beside it (``.npz``).

    Returns the JSON path. Raises :class:`ResultError` if the document does not validate.
    """
    path = Path(path)
    if path.suffix != ".json":
        path = path.with_name(path.name + ".json")
    rows_path = path.with_suffix(".npz")
    doc = result.to_dict(rows_path.name)
    doc = json.loads(json.dumps(doc, default=json_default, allow_nan=False))
    problems = validate(doc)
    if problems:
        raise ResultError("result does not match its schema: " + "; ".join(problems[:5]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(rows_path, "wb") as f:
        np.savez_compressed(f, **result.rows)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_document(
    path: str | os.PathLike[str],
    version: str,
    schema: dict[str, Any],
    error: type[ValueError],
    what: str,
) -> dict[str, Any]:
    """A JSON result file of schema ``version``, validated against ``schema``; anything
    else raises ``error`` saying what was wrong with which file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"cannot read {what} {str(path)!r}: {e}") from e
    found = doc.get("schema") if isinstance(doc, dict) else None
    if found != version:
        raise error(f"{str(path)!r} has schema {found!r}; this cvserve reads {version!r} only")
    problems = validate(doc, schema)
    if problems:
        raise error(f"{str(path)!r} is not a valid {what}: " + "; ".join(problems[:5]))
    return doc


def load_result(path: str | os.PathLike[str], rows: bool = True) -> BenchResult:
    """Read a result written by :func:`save_result` (and its rows, unless ``rows=False``)."""
    path = Path(path)
    doc = read_document(path, SCHEMA_VERSION, RESULT_SCHEMA, ResultError, "bench result")
    columns: dict[str, np.ndarray] = {}
    rows_file = doc["rows"]["file"]
    if rows and rows_file:
        rows_path = path.parent / rows_file
        try:
            with np.load(rows_path, allow_pickle=False) as npz:
                columns = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise ResultError(f"cannot read the rows of {str(path)!r} ({rows_path}): {e}") from e
    return BenchResult(
        command=doc["command"],
        config=doc["config"],
        machine=doc["machine"],
        server=doc["server"],
        points=[PointSummary(**p) for p in doc["points"]],
        rows=columns,
        created=doc["created"],
        label=doc.get("label"),
        schema=doc["schema"],
    )


def write_benchmark(out: str | os.PathLike[str], name: str, config: Any, **sections: Any) -> Path:
    """Write a ``benchmarks/*.py`` result: its name, command line, git commit, time and
    machine, the ``config`` it ran with (an argparse Namespace or a dict), then
    ``sections`` (summaries, rows). Non-JSON values (paths, numpy scalars) become text."""
    import subprocess
    import sys
    import time

    cfg = vars(config) if hasattr(config, "__dict__") else dict(config)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    doc = {
        "benchmark": name,
        "command": [sys.executable, *sys.argv],
        "commit": commit,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "config": cfg,
        **sections,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
