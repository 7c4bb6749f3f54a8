"""The base of every error a request can cause: a message, an HTTP status and details.

Each package defines its own errors beside the code that raises them; the HTTP edge
(``serving.door``) turns any of them into one JSON answer with ``status``.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """An error that answers one request; ``detail`` holds limits and other facts."""

    status = 500
    kind = "internal"

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail

    def to_json(self) -> dict[str, Any]:
        return {"error": {"kind": self.kind, "message": str(self), **self.detail}}


#: The extra of ``pyproject.toml`` that installs each optional top-level module.
EXTRA_OF_MODULE = {
    "cv2": "ocr",
    "rapidocr_onnxruntime": "ocr",
    "pyclipper": "ocr",
    "torch": "zoo",
    "transformers": "zoo",
    "onnxscript": "zoo",
    "pillow_heif": "heic",
    "litserve": "peers",
    "ray": "peers",
    "cupy": "gpu",
    "opentelemetry": "otel",
    "nvidia": "gpu",
    "tensorrt": "gpu",
}


def missing_extra(e: ImportError) -> str | None:
    """One line naming the extra to install for a missing optional module, else None."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(name)
    if extra is None:
        return None
    return (
        f"this needs the {extra} extra (no module named {name!r}): pip install 'cvserve[{extra}]'"
    )
