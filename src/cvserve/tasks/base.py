"""The task-head protocol, the registry of heads by task name, and users' own heads.

A head of your own is any class with the attributes and method of :class:`TaskHead`,
named as ``"package.module:Class"`` (a model's ``head:`` in a config file, ``--head`` on
the command line). :func:`load_head` imports it at start-up and checks it, with one line
saying what is wrong; the server then gives it decoding, batching, admission, stage
timing and every front door. See ``docs/your-own-model-yolo.md`` and
``examples/custom_head/``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any, ClassVar, Protocol

import numpy as np

from cvserve.images.preprocess import ImageMeta
from cvserve.images.spec import PreprocessSpec
from cvserve.models.metadata import ModelMeta
from cvserve.tasks.params import Param


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along ``axis``, in ``x``'s own dtype."""
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


class TaskHead(Protocol):
    """Turns one request's rows of the model outputs into a JSON-able result.

    A head declares the request parameters ``postprocess`` takes (``params``) and whether
    its post-processing and the encoding of its result take real CPU (``heavy``: they run
    on a pool thread, not on the event loop). It is made with the model's ``ModelMeta``
    (its labels, preprocessing spec and ``extra``).

    ``postprocess(outputs, meta, **params)``: ``outputs`` holds one row (no batch axis) of
    each ONNX output, in the model's output order; ``meta`` is the image's
    :class:`~cvserve.images.preprocess.ImageMeta` (``orig_size`` = upright width, height);
    ``params`` are the request's parameters, parsed and checked against ``params`` (only
    those given: defaults are the head's). The result is a dict; numpy arrays in it are
    encoded by the door (PNG in JSON, or npz).

    Optional: ``preprocess``, a :class:`PreprocessSpec` or a dict of its fields, replaces
    the model's own preprocessing (a config's ``preprocess:`` still overrides it)."""

    task: str
    params: ClassVar[tuple[Param, ...]]
    heavy: ClassVar[bool]

    def postprocess(self, outputs: list[np.ndarray], meta: ImageMeta, **params: Any) -> dict: ...


class HeadError(ValueError):
    """A head named by ``package.module:Class`` that cannot be loaded or is no head."""


def load_head(ref: str) -> type:
    """The head class ``ref`` (``"package.module:Class"``), imported and checked against
    :class:`TaskHead`; :class:`HeadError` (one line) otherwise."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise HeadError(f"head {ref!r}: name it as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error while importing it
        raise HeadError(
            f"head {ref!r}: cannot import {module_name}: {type(e).__name__}: {e}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise HeadError(f"head {ref!r}: module {module_name} has no {attr}")
    if not inspect.isclass(obj):
        raise HeadError(f"head {ref!r}: {attr} is not a class")
    problems = _protocol_problems(obj)
    if problems:
        raise HeadError(f"head {ref!r} is not a task head: {'; '.join(problems)}")
    return obj


def _protocol_problems(cls: type) -> list[str]:
    out = []
    if not isinstance(getattr(cls, "task", None), str) or not cls.task:  # type: ignore[attr-defined]
        out.append("task must be a non-empty str")
    params = getattr(cls, "params", None)
    if not isinstance(params, tuple | list) or not all(isinstance(p, Param) for p in params):
        out.append("params must be a tuple of cvserve.tasks.params.Param")
        params = ()
    if not isinstance(getattr(cls, "heavy", None), bool):
        out.append("heavy must be True or False")
    pre = getattr(cls, "preprocess", None)
    if pre is not None and not isinstance(pre, PreprocessSpec | dict):
        out.append("preprocess must be a PreprocessSpec, a dict of its fields, or None")
    post = getattr(cls, "postprocess", None)
    if not callable(post):
        out.append("it has no postprocess(outputs, meta, **params) method")
    else:
        try:
            inspect.signature(post).bind(None, [], None, **{p.name: p.default for p in params})
        except TypeError as e:
            out.append(f"postprocess(self, outputs, meta, **params) does not fit: {e}")
    return out


def head_spec(head: Any, spec: PreprocessSpec) -> PreprocessSpec:
    """``spec`` with the head's own ``preprocess`` (a spec, or a dict of fields) applied."""
    pre = getattr(head, "preprocess", None)
    if pre is None:
        return spec
    if isinstance(pre, PreprocessSpec):
        return pre
    try:
        return spec.replace(**pre)
    except (TypeError, ValueError) as e:
        raise HeadError(f"head {type(head).__name__}: its preprocess {pre!r}: {e}") from None


def get_head(model: ModelMeta, head: str | None = None) -> TaskHead:
    """The head of ``model``: ``head`` (``"package.module:Class"``, see :func:`load_head`)
    when given, else the head of ``model.task``: a new task is one new module
    ``cvserve.tasks.<task>`` whose ``HEAD`` is its TaskHead class."""
    if head:
        cls = load_head(head)
        try:
            takes_model = len(inspect.signature(cls).parameters) > 0
            return cls(model) if takes_model else cls()
        except HeadError:
            raise
        except Exception as e:  # the user's constructor
            raise HeadError(
                f"head {head!r}: {cls.__name__}(model) failed: {type(e).__name__}: {e}"
            ) from None
    task = model.task
    found = None
    if task.isidentifier() and importlib.util.find_spec(f"cvserve.tasks.{task}") is not None:
        found = getattr(importlib.import_module(f"cvserve.tasks.{task}"), "HEAD", None)
    if found is None:
        raise ValueError(
            f"model {model.name!r} has task {task!r}, and no module cvserve.tasks.{task} "
            "defines its HEAD (classify, segment, detect, depth, embed and the yolo_* tasks do); "
            "serve it with a head of your own: --head package.module:Class"
        )
    return found(model)
