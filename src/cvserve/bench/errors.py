"""Why a bench could not run (errors it measured are counted in the result instead)."""

from __future__ import annotations

from typing import Any

__all__ = ["BenchError", "BenchInterrupted", "ServerUnreachable", "TargetNotServed"]


class BenchError(Exception):
    """The bench could not run (as opposed to errors it measured, which are counted)."""


class ServerUnreachable(BenchError):
    """The server was not ready (``/readyz``, ``/v2/health/ready`` or gRPC ``ServerReady``)
    before the sweep, or could not be reached."""


class TargetNotServed(BenchError):
    """The server does not serve the model (or pipeline) asked for: 404 / NOT_FOUND."""


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: ``result`` holds the points that finished (None if none did),
    so the caller can keep them; ``--resume`` measures the rest."""

    def __init__(self, result: Any) -> None:
        super().__init__("interrupted")
        self.result = result
