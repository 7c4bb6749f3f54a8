"""A pipeline declared as data: named steps (models and built-in operations) joined by
their inputs, checked at start-up (see ``docs/pipelines.md``).

Each step names what it is (``model``, ``op``, ``crop``, ``filter`` or ``gallery``) and
where its input comes from (``input``; ``image`` by default, or another step). Steps whose
inputs are ready run at the same time (a branch). A model step whose input is a ``crop``
step runs once per crop (fan-out) and its answers are joined back in crop order.

What every step produces (its type) is known before anything runs, so a cycle, an input
that names no step, a crop from a step without boxes, or a gallery fed by something other
than an embedding is one line at start-up naming the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cvserve.config.checks import ConfigError

#: What a step produces, by the kind of thing it is (``model`` steps: by their task).
IMAGE, BOXES, POLYGONS, CROPS, VECTOR, ANSWER, TEXT = (
    "image", "boxes", "polygons", "crops", "vector", "answer", "text",
)  # fmt: skip
#: Built-in operations that need no model of the store (the packaged PP-OCR models).
OPS = {"ocr_det": (IMAGE, POLYGONS), "ocr_rec": (CROPS, TEXT)}
#: A model's task -> the type of its answer (what a following step may take from it).
TASK_TYPES = {"detect": BOXES, "embed": VECTOR}
EDGES = ("inprocess", "broker")
_KINDS = ("model", "op", "crop", "filter", "gallery")
_COMMON = {
    "name", "input", "via", "max_batch_size", "instances", "cores", "params", "output", "dnn",
}  # fmt: skip
_KEYS = {
    "model": _COMMON,
    "op": _COMMON,
    "crop": {"name", "margin", "min_size", "square", "upright", "output"},
    "filter": {"name", "top_k", "labels", "score_above", "output"},
    "gallery": {"name", "file", "k", "metric", "output"},
}


@dataclass(frozen=True)
class Step:
    """One step of a declared pipeline (the fields that do not apply to its kind are
    their defaults)."""

    name: str
    kind: str  # model | op | crop | filter | gallery
    #: the model's store name, the op's name, or the step a crop/filter/gallery reads
    target: str
    input: str = IMAGE  # model/op/gallery: "image" or a step name
    #: model/op: "inprocess" (in the request's thread) or "broker" (batched across requests
    #: by workers: in the server, or ``cvserve worker --stage NAME`` processes)
    via: str = "inprocess"
    max_batch_size: int | None = None  # None: the pipeline's max_batch_size
    instances: int | None = None  # per ``cvserve worker`` process; None: the pipeline's
    cores: int = 0  # 0: the pipeline's CPU budget; N: this step's own N cores
    params: dict[str, Any] = field(default_factory=dict)  # the model's task parameters
    margin: float = 0.0  # crop: grow each box by this fraction of its size on every side
    min_size: int = 1  # crop: drop boxes narrower or lower than this (pixels)
    square: bool = False  # crop: grow each box to a square (keeps the aspect)
    upright: bool = True  # crop of polygons: turn each text region upright
    top_k: int | None = None  # filter: the best-scoring k
    labels: tuple[str, ...] = ()  # filter: keep these labels (empty: all)
    score_above: float | None = None  # filter
    file: str = ""  # gallery: .npz (names, vectors) or .json {name: vector}
    k: int = 1  # gallery: neighbours answered
    metric: str = "cosine"  # gallery: cosine | l2
    output: bool = True  # whether its answer appears in the pipeline's answer
    #: the name a per-DNN ``sim_profile`` gives this step's model (default: the step's)
    dnn: str = ""

    def dnns(self) -> tuple[str, ...]:
        """The DNNs this step opens (the keys of a per-DNN simulated profile)."""
        if self.kind == "op":
            return ("det",) if self.target == "ocr_det" else ("cls", "rec")
        return (self.dnn or self.name,) if self.kind == "model" else ()

    @property
    def source(self) -> str:
        """The step or "image" this step reads."""
        return self.target if self.kind in ("crop", "filter", "gallery") else self.input


def _bad(step: str, text: str) -> ConfigError:
    return ConfigError(f"step {step!r}: {text}")


def step_from_dict(d: Any, where: str) -> Step:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
        raise ConfigError(f"{where}: every step needs a name: {d!r}")
    name = d["name"]
    kinds = [k for k in _KINDS if k in d]
    if len(kinds) != 1:
        raise _bad(name, f"say what it is with exactly one of {', '.join(_KINDS)}")
    kind = kinds[0]
    unknown = set(d) - _KEYS[kind] - {kind}
    if unknown:
        raise _bad(name, f"unknown keys {sorted(unknown)} for a {kind} step; "
                         f"known: {sorted(_KEYS[kind])}")  # fmt: skip
    target = d[kind]
    if not isinstance(target, str) or not target:
        raise _bad(name, f"{kind} must name something, not {target!r}")
    args = {k: v for k, v in d.items() if k not in ("name", kind)}
    if "labels" in args:
        if not isinstance(args["labels"], list | tuple) or not all(
            isinstance(x, str | int) for x in args["labels"]
        ):
            raise _bad(name, "labels must be a list of label names")
        args["labels"] = tuple(str(x) for x in args["labels"])
    try:
        step = Step(name=name, kind=kind, target=target, **args)
    except TypeError as e:
        raise _bad(name, str(e)) from None
    _check_values(step)
    return step


def _check_values(s: Step) -> None:
    def whole(key: str, lo: int) -> None:
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _bad(s.name, f"{key} must be an integer >= {lo}, not {v!r}")

    def number(key: str, lo: float, hi: float) -> None:
        v = getattr(s, key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise _bad(s.name, f"{key} must be a number in [{lo}, {hi}], not {v!r}")

    if s.name == IMAGE:
        raise _bad(s.name, "'image' is the pipeline's input: name the step otherwise")
    if s.via not in EDGES:
        raise _bad(s.name, f"via must be one of {', '.join(EDGES)}, not {s.via!r}")
    for key in ("min_size", "k"):
        whole(key, 1)
    for key in ("max_batch_size", "instances"):
        if getattr(s, key) is not None:
            whole(key, 1)
    whole("cores", 0)
    if s.top_k is not None:
        whole("top_k", 1)
    number("margin", 0.0, 10.0)
    if s.score_above is not None:
        number("score_above", -1e9, 1e9)
    if not isinstance(s.params, dict):
        raise _bad(s.name, f"params must be a mapping, not {s.params!r}")
    if s.kind == "op" and s.target not in OPS:
        raise _bad(s.name, f"unknown op {s.target!r}; built-in: {', '.join(OPS)}")
    if s.kind == "gallery":
        if not s.file:
            raise _bad(s.name, "a gallery needs file: (.npz with names and vectors, or .json)")
        if s.metric not in ("cosine", "l2"):
            raise _bad(s.name, f"metric must be cosine or l2, not {s.metric!r}")


@dataclass(frozen=True)
class Graph:
    """A checked pipeline graph: its steps in an order where every input comes first."""

    steps: tuple[Step, ...]
    #: step -> what it produces (``model`` steps: filled in once their task is known)
    types: dict[str, str]
    #: step -> the crop step it runs once per crop of ("" : once per image)
    scope: dict[str, str]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    @property
    def broker_steps(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.via == "broker" and s.kind in ("model", "op"))

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": s.name, "kind": s.kind, "what": s.target, "input": s.source,
             "via": s.via, "type": self.types[s.name], "per_crop_of": self.scope[s.name] or None}
            for s in self.steps
        ]  # fmt: skip


def parse_steps(raw: Any, where: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: steps must be a non-empty list")
    steps = tuple(step_from_dict(d, where) for d in raw)
    names = [s.name for s in steps]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: step names must be unique: {dup}")
    return steps


def build_graph(steps: tuple[Step, ...], task_of: Any = None) -> Graph:
    """Order and type-check ``steps``; ``task_of(step)`` gives a model step's task (None:
    types of model steps are taken as ``answer`` unless their params say otherwise)."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        if s.source != IMAGE and s.source not in by_name:
            raise _bad(s.name, f"reads {s.source!r}, which is no step of this pipeline "
                               f"(steps: {', '.join(by_name)}; or 'image')")  # fmt: skip
    order: list[Step] = []
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(s: Step) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            raise _bad(s.name, "is part of a cycle: a step cannot read its own answer")
        state[s.name] = 1
        if s.source != IMAGE:
            visit(by_name[s.source])
        state[s.name] = 2
        order.append(s)

    for s in steps:
        visit(s)
    types: dict[str, str] = {IMAGE: IMAGE}
    scope: dict[str, str] = {IMAGE: ""}
    for s in order:
        got = types[s.source]
        if s.kind in ("model", "op"):
            want = OPS[s.target][0] if s.kind == "op" else None
            if want is not None and got != want:
                raise _bad(s.name, f"op {s.target} reads {want}, but {s.source!r} gives {got}")
            if want is None and got not in (IMAGE, CROPS):
                raise _bad(s.name, f"a model reads the image or crops, but {s.source!r} "
                                   f"gives {got}")  # fmt: skip
            if s.kind == "op":
                out = OPS[s.target][1]
            else:
                task = task_of(s) if task_of is not None else None
                out = TASK_TYPES.get(task or "", ANSWER)
            scope[s.name] = s.source if got == CROPS else scope[s.source]
        elif s.kind == "crop":
            if got not in (BOXES, POLYGONS):
                raise _bad(s.name, f"crops need boxes (a detect model, a filter) or polygons "
                                   f"(op ocr_det), but {s.source!r} gives {got}")  # fmt: skip
            if scope[s.source]:
                raise _bad(s.name, "crops of crops are not supported: crop from a step "
                                   "that runs on the whole image")  # fmt: skip
            out, scope[s.name] = CROPS, ""
        elif s.kind == "filter":
            if got != BOXES:
                raise _bad(s.name, f"a filter reads boxes, but {s.source!r} gives {got}")
            out, scope[s.name] = BOXES, scope[s.source]
        else:  # gallery
            if got != VECTOR:
                raise _bad(s.name, f"a gallery reads embeddings (an embed model), but "
                                   f"{s.source!r} gives {got}")  # fmt: skip
            out, scope[s.name] = ANSWER, scope[s.source]
        types[s.name] = out
    for s in order:
        if s.via == "broker" and s.kind not in ("model", "op"):
            raise _bad(s.name, "only model and op steps run over the broker")
    del types[IMAGE], scope[IMAGE]
    return Graph(steps=tuple(order), types=types, scope=scope)
