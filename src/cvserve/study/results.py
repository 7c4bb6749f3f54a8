"""Study results on disk: one JSON document per experiment (schema ``cvserve.study/1``).

A document holds the experiment's points (what was varied, as ``labels``; what was
measured, as ``metrics``), the numbers derived from them, and the finding sentences
computed from those numbers. Every point says whether its inference was simulated, and so
does the document, so a simulated number can never pass for a measured one.

Point metrics (all optional but ``throughput_rps``; times in ms, shares in %):
``throughput_rps``, ``mean_ms``, ``p50_ms``, ``p99_ms``, ``errors``, ``mean_batch``,
``breakdown_ms`` and ``breakdown_pct`` ({stage: value}, the stage vocabulary of
``cvserve.trace``), plus what an experiment adds (``infer_share_pct``,
``preprocess_share_pct``, ``queue_ms``, ``broker_ms``, ``broker_share_pct``, ...).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cvserve.bench.results import json_default, read_document, validate
from cvserve.machine import machine_info

SCHEMA_VERSION = "cvserve.study/1"

#: The experiments, in the order the report shows them.
EXPERIMENTS: tuple[str, ...] = (
    "setups",
    "models",
    "concurrency",
    "image-sizes",
    "broker",
    "accelerator",
)

__all__ = [
    "EXPERIMENTS",
    "SCHEMA_VERSION",
    "STUDY_SCHEMA",
    "ExperimentResult",
    "Finding",
    "Point",
    "StudyResultError",
    "load_experiment",
    "save_experiment",
]


class StudyResultError(ValueError):
    """A study result file that cannot be read or does not match its schema."""


@dataclass
class Point:
    """One measured (or skipped) point of an experiment."""

    id: str  # unique within the experiment, stable across runs (``--resume`` keys on it)
    labels: dict[str, Any]  # what was varied: {"setup": "baseline", "concurrency": 16}
    status: str = "ok"  # "ok" | "skipped" | "failed"
    reason: str | None = None  # why skipped or failed
    metrics: dict[str, Any] = field(default_factory=dict)
    simulated: bool = False  # inference came from the simulated accelerator
    command: str | None = None  # the server command (or what ran) for this point
    elapsed_s: float = 0.0


@dataclass
class Finding:
    """One sentence of the report, and the numbers in it (rounded as printed)."""

    id: str
    text: str
    values: dict[str, float]


@dataclass
class ExperimentResult:
    """One experiment's whole result."""

    experiment: str
    title: str
    command: list[str]  # reproduces this experiment alone
    profile: str  # "quick" | "default"
    params: dict[str, Any]
    points: list[Point] = field(default_factory=list)
    derived: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    paper: dict[str, str] = field(default_factory=dict)  # {"figure", "claim"}
    machine: dict[str, Any] = field(default_factory=machine_info)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    elapsed_s: float = 0.0
    schema: str = SCHEMA_VERSION

    @property
    def simulated(self) -> bool:
        return any(p.simulated for p in self.points)

    def point(self, point_id: str) -> Point | None:
        return next((p for p in self.points if p.id == point_id), None)

    def ok_points(self, **labels: Any) -> list[Point]:
        """Measured points whose labels include ``labels``."""
        return [
            p
            for p in self.points
            if p.status == "ok" and all(p.labels.get(k) == v for k, v in labels.items())
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["simulated"] = self.simulated
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentResult:
        d = dict(d)
        d.pop("simulated", None)
        d["points"] = [Point(**p) for p in d.get("points", [])]
        d["findings"] = [Finding(**f) for f in d.get("findings", [])]
        return cls(**d)


# --- schema ----------------------------------------------------------------------------
_NUM = {"type": "number"}
_STR = {"type": "string"}
_POINT = {
    "type": "object",
    "required": ["id", "labels", "status", "metrics", "simulated"],
    "additionalProperties": False,
    "properties": {
        "id": _STR,
        "labels": {"type": "object"},
        "status": {"enum": ["ok", "skipped", "failed"]},
        "reason": {"type": ["string", "null"]},
        "metrics": {"type": "object"},
        "simulated": {"type": "boolean"},
        "command": {"type": ["string", "null"]},
        "elapsed_s": {"type": "number", "minimum": 0},
    },
}
STUDY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": SCHEMA_VERSION,
    "type": "object",
    "required": [
        "schema",
        "experiment",
        "title",
        "command",
        "profile",
        "params",
        "points",
        "derived",
        "findings",
        "paper",
        "machine",
        "created",
        "simulated",
    ],  # fmt: skip
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_VERSION},
        "experiment": {"enum": list(EXPERIMENTS)},
        "title": _STR,
        "command": {"type": "array", "items": _STR},
        "profile": {"enum": ["quick", "default"]},
        "params": {"type": "object"},
        "points": {"type": "array", "items": _POINT},
        "derived": {"type": "object"},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "text", "values"],
                "additionalProperties": False,
                "properties": {
                    "id": _STR,
                    "text": _STR,
                    "values": {"type": "object", "additionalProperties": _NUM},
                },
            },
        },
        "paper": {"type": "object", "additionalProperties": _STR},
        "machine": {"type": "object", "required": ["cpu_model", "cores", "python", "versions"]},
        "created": _STR,
        "elapsed_s": {"type": "number", "minimum": 0},
        "simulated": {"type": "boolean"},
    },
}


def experiment_path(out_dir: str | os.PathLike[str], experiment: str) -> Path:
    return Path(out_dir) / f"{experiment}.json"


def save_experiment(result: ExperimentResult, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``OUT/<experiment>.json`` atomically; raises if it does not validate."""
    doc = json.loads(json.dumps(result.to_dict(), default=json_default, allow_nan=False))
    problems = validate(doc, STUDY_SCHEMA)
    if problems:
        raise StudyResultError("study result does not match its schema: " + "; ".join(problems[:5]))
    path = experiment_path(out_dir, result.experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_experiment(path: str | os.PathLike[str]) -> ExperimentResult:
    """Read and validate one experiment's JSON."""
    doc = read_document(path, SCHEMA_VERSION, STUDY_SCHEMA, StudyResultError, "study result")
    return ExperimentResult.from_dict(doc)
