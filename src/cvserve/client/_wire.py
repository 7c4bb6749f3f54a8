"""What the sync and asyncio clients share: an image (a path, bytes, a PIL image, an
array) to a request body, and a response to an :class:`Answer` or a typed error."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cvserve.client.errors import CvserveError, error_for
from cvserve.trace import parse_server_timing, server_timing_simulated

__all__ = ["Answer", "ImageLike", "Request", "answer_from", "build_request"]

#: What ``predict`` takes as an image: a file path, the encoded bytes, a PIL image, or an
#: ``HxW`` / ``HxWx3`` / ``HxWx4`` uint8 array (RGB order); the last two go as PNG.
ImageLike = Any

_NPZ = "application/x-npz"


@dataclass
class Answer:
    """A server's answer: ``result`` (the JSON body as a dict; for several images its
    ``results`` list; an ``Accept: image/png`` answer's bytes), ``timings`` (stage name ->
    milliseconds, from ``Server-Timing``), ``request_id`` (the server's log line has it)."""

    result: Any
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str | None = None
    status: int = 200
    content_type: str = "application/json"
    #: the inference ran on the simulated accelerator (``sim=1``): its ``infer`` time is
    #: a profile's, not a real DNN's
    simulated: bool = False

    @property
    def server_ms(self) -> float:
        """The server's own time for the request: the sum of its stages."""
        return sum(self.timings.values())

    def __getitem__(self, key: str) -> Any:
        return self.result[key]

    def array(self, key: str) -> Any:
        """A JSON answer's encoded array (a mask, a depth map: ``{"encoding": ...}``) as a
        numpy array; an npz answer's arrays are arrays already."""
        value = self.result[key]
        if isinstance(value, dict) and "encoding" in value:
            from cvserve.tasks.encode import decode_array

            return decode_array(value)
        return value


@dataclass(frozen=True)
class Request:
    """One predict request, ready for httpx."""

    path: str
    headers: dict[str, str]
    params: dict[str, str]
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None


def build_request(
    kind: str,
    name: str,
    images: list[ImageLike],
    *,
    many: bool,
    params: dict[str, Any] | None,
    deadline_ms: float | None,
    accept: str | None,
) -> Request:
    """``POST /v1/{kind}s/{name}:predict`` with one image as the body, or several as a
    multipart form (one answer each, in order)."""
    headers: dict[str, str] = {}
    if deadline_ms is not None:
        headers["X-Timeout-Ms"] = f"{float(deadline_ms):g}"
    if accept is not None:
        headers["Accept"] = accept
    query = {k: _param(v) for k, v in (params or {}).items()}
    path = f"/v1/{kind}s/{name}:predict"
    encoded = [_encode(im) for im in images]
    if not many:
        data, ctype, _ = encoded[0]
        return Request(path, {**headers, "Content-Type": ctype}, query, content=data)
    files = [("images", (fname, data, ctype)) for data, ctype, fname in encoded]
    return Request(path, headers, query, files=files)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _encode(image: ImageLike) -> tuple[bytes, str, str]:
    """``(bytes, content type, file name)`` of one image."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read(), "application/octet-stream", os.path.basename(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream", "image"
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        return _png(image), "image/png", "image.png"
    if hasattr(image, "__array_interface__") or hasattr(image, "__array__"):
        import numpy as np
        from PIL import Image

        a = np.asarray(image)
        if (
            a.dtype != np.uint8
            or a.ndim not in (2, 3)
            or (a.ndim == 3 and a.shape[2] not in (3, 4))
        ):
            raise TypeError(
                f"an image array is HxW, HxWx3 (RGB) or HxWx4 uint8; got {a.shape} {a.dtype}"
            )
        return _png(Image.fromarray(a)), "image/png", "image.png"
    raise TypeError(
        f"cannot send a {type(image).__name__}: pass a path, bytes, a PIL image or an array"
    )


def _png(im: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)  # lossless; level 1: fast, the server decodes it
    return buf.getvalue()


def answer_from(status: int, headers: Any, body: bytes) -> Answer:
    """An :class:`Answer` of a 2xx response, else raise its typed error."""
    if status >= 400:
        raise error_for(status, body, headers)
    timing = headers.get("server-timing")
    stages, _ = parse_server_timing(timing)
    ctype = headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype == "application/json":
        result: Any = json.loads(body)
    elif ctype == _NPZ:
        from cvserve.tasks.encode import decode_npz

        meta, arrays = decode_npz(body)
        result = _restore(meta, arrays)
    else:
        result = body
    return Answer(
        result=result,
        timings={k: v * 1000.0 for k, v in stages.items()},
        request_id=headers.get("x-request-id"),
        status=status,
        content_type=ctype,
        simulated=server_timing_simulated(timing),
    )


def _restore(x: Any, arrays: dict[str, Any]) -> Any:
    """An npz answer's JSON with each ``{"npz": name, ...}`` stand-in replaced by its array."""
    if isinstance(x, dict):
        if set(x) == {"npz", "dtype", "shape"} and x["npz"] in arrays:
            return arrays[x["npz"]]
        return {k: _restore(v, arrays) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore(v, arrays) for v in x]
    return x


def describe(status: int, headers: Any, body: bytes) -> Any:
    """The JSON of a describing route (models, pipelines), else its typed error."""
    if status >= 400:
        raise error_for(status, body, headers)
    return json.loads(body)


def unreachable(url: str, e: Exception) -> CvserveError:
    from cvserve.client.errors import Unreachable

    return Unreachable(f"{url}: {type(e).__name__}: {e}")
