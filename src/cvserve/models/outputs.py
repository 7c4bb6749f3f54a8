"""A user's ONNX file checked at add time (:func:`inspect_user_onnx`): its one image input,
and which output is what, the output roles each task's head reads.

``cvserve models add FILE --task T --output ROLE=NAME ...`` names, for each role of the
task, the graph output that holds it; :func:`resolve` checks the mapping against the
file's declared outputs at add time and says, in one line, what does not match. The store
then keeps the graph with exactly the role outputs, in role order, which is the order the
task's head reads them in.

Without ``--output``, a graph whose outputs are named like the roles maps by name, and a
graph with exactly as many outputs as the task has roles maps in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvserve.images.spec import PreprocessSpec
from cvserve.models.errors import InvalidModel


@dataclass(frozen=True)
class Role:
    """One output a head reads: its name, the ranks it may have (batch axis included),
    what its axes mean (for messages) and a fixed last dimension, if any."""

    name: str
    ranks: tuple[int, ...]
    axes: str
    last: int | None = None


ROLES: dict[str, tuple[Role, ...]] = {
    "classify": (Role("logits", (2,), "N, classes"),),
    "segment": (Role("logits", (4,), "N, classes, h, w"),),
    "detect": (
        Role("logits", (3,), "N, queries, classes"),
        Role("pred_boxes", (3,), "N, queries, 4 (cx, cy, w, h in 0..1)", last=4),
    ),
    "depth": (Role("predicted_depth", (3, 4), "N, h, w or N, 1, h, w"),),
    "embed": (Role("embedding", (2, 3), "N, D or N, tokens, D (first token)"),),
}


class OutputMismatch(ValueError):
    """The mapping does not fit the ONNX file (one line)."""


def parse_mapping(items: Sequence[str]) -> dict[str, str]:
    """``["logits=out0", ...]`` -> ``{"logits": "out0"}``."""
    out: dict[str, str] = {}
    for item in items:
        role, sep, name = item.partition("=")
        if not sep or not role or not name:
            raise OutputMismatch(f"--output {item!r}: write ROLE=OUTPUT_NAME, e.g. logits=output0")
        out[role.strip()] = name.strip()
    return out


def resolve(
    task: str,
    declared: Sequence[tuple[str, Sequence[int | str | None]]],
    mapping: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
) -> list[str]:
    """The graph output names, in role order, for ``task``; ``declared`` is the file's
    outputs as (name, shape). Raises OutputMismatch naming what does not fit."""
    if task not in ROLES:
        raise OutputMismatch(f"task {task!r} has no output roles; tasks: {', '.join(ROLES)}")
    roles = ROLES[task]
    role_names = [r.name for r in roles]
    shapes = {n: list(s) for n, s in declared}
    have = ", ".join(f"{n}{list(s)}" for n, s in declared)
    if mapping:
        unknown = sorted(set(mapping) - set(role_names))
        if unknown:
            raise OutputMismatch(
                f"task {task} has no output role {unknown[0]!r}; its roles: {', '.join(role_names)}"
            )
        missing = [r for r in role_names if r not in mapping]
        if missing:
            raise OutputMismatch(
                f"task {task} needs --output {missing[0]}=NAME too (the file's outputs: {have})"
            )
        chosen = [mapping[r] for r in role_names]
    elif all(r in shapes for r in role_names):
        chosen = role_names
    elif len(declared) == len(roles):
        chosen = [n for n, _ in declared]
    else:
        pairs = " ".join(f"--output {r}=NAME" for r in role_names)
        raise OutputMismatch(
            f"the file has {len(declared)} outputs ({have}); say which is which: {pairs}"
        )
    for role, name in zip(roles, chosen, strict=True):
        if name not in shapes:
            raise OutputMismatch(f"--output {role.name}={name}: the file has no output {name!r} "
                                 f"(its outputs: {have})")  # fmt: skip
        _check_shape(task, role, name, shapes[name])
    if len(set(chosen)) != len(chosen):
        raise OutputMismatch(
            f"one output is mapped to two roles: {dict(zip(role_names, chosen, strict=True))}"
        )
    _check_together(task, chosen, shapes, labels)
    return chosen


def _check_shape(task: str, role: Role, name: str, shape: list) -> None:
    if len(shape) not in role.ranks:
        want = " or ".join(str(r) for r in role.ranks)
        raise OutputMismatch(
            f"output {name!r} has shape {shape} (rank {len(shape)}) but {task}'s {role.name} "
            f"has rank {want} ({role.axes})"
        )
    last = shape[-1]
    if role.last is not None and isinstance(last, int) and last > 0 and last != role.last:
        raise OutputMismatch(
            f"output {name!r} has shape {shape} but {task}'s {role.name} ends in {role.last} "
            f"({role.axes})"
        )


def _dim(shape: list, axis: int) -> int | None:
    d = shape[axis]
    return d if isinstance(d, int) and d > 0 else None


def _check_together(
    task: str, chosen: list[str], shapes: dict, labels: Sequence[str] | None
) -> None:
    first = shapes[chosen[0]]
    if task == "detect":
        q1, q2 = _dim(first, 1), _dim(shapes[chosen[1]], 1)
        if q1 and q2 and q1 != q2:
            raise OutputMismatch(
                f"logits {chosen[0]!r} has {q1} queries but pred_boxes {chosen[1]!r} has {q2}"
            )
    if labels and task in ("classify", "segment", "detect"):
        classes = _dim(first, 1 if task == "segment" else -1)
        # a DETR-style softmax detector has one more class: "no object"
        ok = {len(labels)} | ({len(labels) + 1} if task == "detect" else set())
        if classes and classes not in ok:
            raise OutputMismatch(
                f"output {chosen[0]!r} has {classes} classes but {len(labels)} labels were given"
            )


def keep_only(path: Path, names: list[str]) -> None:
    """Rewrite the ONNX graph at ``path`` to have exactly the outputs ``names``, in order."""
    import onnx

    proto = onnx.load(str(path))
    by_name = {o.name: o for o in proto.graph.output}
    chosen = [by_name[n] for n in names]
    del proto.graph.output[:]
    proto.graph.output.extend(chosen)
    onnx.save(proto, str(path))


_ONNX_DTYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8"}


def inspect_user_onnx(
    path: Path,
    spec: PreprocessSpec,
    task: str,
    labels: list[str] | None,
    mapping: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A user's ONNX file checked against ``spec`` and ``task`` (one image input of rank 4
    agreeing with the spec; the task's output roles, :func:`resolve`): its input, and the
    outputs to keep (``keep_outputs``, None: all, as they are). InvalidModel otherwise."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise InvalidModel(f"{path}: onnxruntime cannot load it: {e}") from e
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name}{i.shape}" for i in inputs)
        raise InvalidModel(f"{path}: needs exactly one image input, has {len(inputs)}: {names}")
    inp = inputs[0]
    dtype = _ONNX_DTYPES.get(inp.type)
    if dtype is None:
        raise InvalidModel(
            f"{path}: input {inp.name!r} is {inp.type}; an image input is float32 or uint8"
        )
    if dtype != spec.dtype:
        raise InvalidModel(
            f"{path}: input {inp.name!r} is {dtype} but the preprocessing spec sends {spec.dtype}"
        )
    shape = [d if isinstance(d, int) and d > 0 else None for d in inp.shape]
    if len(shape) != 4:
        raise InvalidModel(
            f"{path}: input {inp.name!r} has shape {inp.shape}; an image batch has rank 4 "
            f"({'N,3,H,W' if spec.layout == 'NCHW' else 'N,H,W,3'})"
        )
    for axis, (got, want) in enumerate(zip(shape[1:], spec.input_shape, strict=True), 1):
        if got is not None and got != want:
            raise InvalidModel(
                f"{path}: input {inp.name!r} has shape {inp.shape} but the preprocessing spec "
                f"makes {spec.layout} {list(spec.input_shape)} (axis {axis}: {got} != {want})"
            )
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    keep = None
    if task in ROLES:
        declared = [(o.name, list(o.shape)) for o in outputs]
        try:
            chosen = resolve(task, declared, mapping, labels)
        except OutputMismatch as e:
            raise InvalidModel(f"{path}: {e}") from None
        if chosen != names:
            keep, names = chosen, chosen
    elif mapping:
        raise InvalidModel(f"{path}: task {task!r} takes no --output mapping")
    return {
        "input_name": inp.name,
        "input_shape": shape,
        "input_dtype": dtype,
        "output_names": names,
        "keep_outputs": keep,
    }
