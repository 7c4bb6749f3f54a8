"""What every baseline server shares: the ``/readyz`` that ``ServerProcess`` waits for, and
the command line (``--host``, ``--port``, the script's own flags) that runs its app under
uvicorn. Imported by the scripts beside it (run as scripts, this folder is on the path)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fastapi import FastAPI


def add_readyz(app: FastAPI) -> FastAPI:
    """``GET /readyz``: ready as soon as the app exists (its models load before)."""

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True}

    return app


def serve_main(
    doc: str | None,
    port: int,
    create_app: Callable[[argparse.Namespace], FastAPI],
    argv: list[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None,
) -> None:
    """Parse ``--host``, ``--port`` (default ``port``) and the flags ``add_args`` adds, then
    serve ``create_app(args)`` quietly (no access log) until stopped."""
    p = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    add_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)
    a = p.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(a), host=a.host, port=a.port, log_level="warning", access_log=False)
