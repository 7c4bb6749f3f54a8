"""Transport-neutral KServe v2 inference requests and responses.

Both doors (HTTP JSON/binary, gRPC protobuf) parse their wire format into these, and
encode these back; :mod:`cvserve.serving.v2.infer` runs them through the serving core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "Tensor",
    "datatype_of",
    "dtype_of",
]

#: v2 datatype -> numpy dtype (BYTES are lists of bytes objects, not an ndarray).
DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": None,
}
_BY_DTYPE = {dt: name for name, dt in DATATYPES.items() if dt is not None}


def dtype_of(datatype: str) -> np.dtype | None:
    """The numpy dtype of a v2 datatype (None for BYTES); KeyError for unknown ones."""
    return DATATYPES[datatype]


def datatype_of(dtype: np.dtype | str) -> str:
    """The v2 datatype of a numpy dtype (object arrays of bytes are BYTES)."""
    dt = np.dtype(dtype)
    if dt == np.dtype(object) or dt.kind in ("S", "O"):
        return "BYTES"
    return _BY_DTYPE[dt]


@dataclass
class Tensor:
    """A named tensor. ``data`` is an ndarray of ``shape`` for numeric datatypes, or a flat
    list of ``prod(shape)`` bytes objects for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    """An output the client asked for: ``binary`` (HTTP binary extension; None = the
    request's default), ``classification`` top-k strings instead of the tensor (0 = off)."""

    name: str
    binary: bool | None = None
    classification: int = 0
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    model: str
    inputs: list[Tensor]
    version: str | None = None
    id: str | None = None
    #: None: every output the model has (its raw outputs and its task's outputs)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """How many images (rows of the batch axis) the request carries."""
        shape = self.inputs[0].shape if self.inputs else []
        return int(shape[0]) if shape else 1


@dataclass
class InferResponse:
    model: str
    version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
