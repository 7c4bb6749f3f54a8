"""Peer servers: the same ONNX file and the same baseline preprocessing, served by LitServe
and by Ray Serve, so the study compares serving frameworks and not model code.

Each peer runs :class:`cvserve.study.baseline.BaselineModel` (full PIL decode, HF-like
resize/crop, float64 normalize, onnxruntime at batch 1) behind the framework's own HTTP
front and worker model, at the framework's defaults except where the comparison needs
them pinned: batch size 1 and one worker, as the baseline.

- **LitServe**: ``LitAPI(max_batch_size=1)``, one inference worker on the CPU
  (``accelerator="cpu", devices=1, workers_per_device=1``) and one API-server process,
  its defaults otherwise (30 s queue timeout). The API process puts each request on a
  queue to the worker process, which runs ``decode_request`` (preprocess), ``predict``
  (infer) and ``encode_response`` (postprocess) one request at a time. Its handler sees
  the body only, so ``?top_k=`` is ignored (always 5).
- **Ray Serve**: one replica (``num_replicas=1``), batch 1, its default
  ``max_ongoing_requests``, behind Ray's HTTP proxy actor; the replica runs the handler
  in a thread, as the baseline does. A local Ray instance is started for it
  (``num_cpus=os.cpu_count()``, a 128 MiB object store, no dashboard, no usage stats,
  loopback only); starting takes ~6 s and ~1 GB of memory on a 2-core machine.

Both answer the baseline's URLs: ``POST /v1/models/{name}:predict`` with the raw image
body, ``GET /readyz``, ``GET /v1/models`` and ``GET /v1/models/{name}``, with cvserve's
JSON shape (errors too) and a ``Server-Timing`` header, so ``cvserve bench`` drives and
breaks down all of them alike. The framework's own time outside the handler is
``queue``: for LitServe the front measures it (its queue to the worker and back); for
Ray Serve the proxy-to-replica hop is not seen by the replica and lands in what the
client sees beyond the reported stages, which the study calls ``unreported`` for a peer
(``network`` for cvserve and the baseline, whose every step is reported).

Install with ``pip install 'cvserve[peers]'`` (neither pulls torch);
:func:`available_peers` says which peers can run here.

    python -m cvserve.study.peers litserve --onnx MODEL.onnx --name resnet50 --port 8002
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvserve.serving.process import ServerProcess
from cvserve.study.baseline import BaselineProcess

__all__ = [
    "PEERS",
    "LitServeProcess",
    "RayServeProcess",
    "available_peers",
    "peer_process",
]

#: peer name -> (modules it needs, pip requirement that brings them)
_REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "litserve": (("litserve", "fastapi"), "litserve"),
    "ray-serve": (("ray", "ray.serve", "fastapi", "aiohttp"), "ray[serve]"),
}
PEERS: tuple[str, ...] = tuple(_REQUIREMENTS)


def _findable(module: str) -> bool:
    """Whether ``module`` is installed, without importing it (importing ray takes ~1 s)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    for part in rest:
        if spec is None or not spec.submodule_search_locations:
            return False
        where = [Path(p) / part for p in spec.submodule_search_locations]
        if not any((w / "__init__.py").is_file() or w.with_suffix(".py").is_file() for w in where):
            return False
    return spec is not None


def available_peers() -> dict[str, str | None]:
    """``{peer: None}`` for each peer that can run here, else ``{peer: why not}``."""
    out: dict[str, str | None] = {}
    for peer, (modules, req) in _REQUIREMENTS.items():
        missing = [m for m in modules if not _findable(m)]
        out[peer] = (
            f"{', '.join(missing)} not installed (pip install 'cvserve[peers]', or '{req}')"
            if missing
            else None
        )
    return out


class _PeerProcess(BaselineProcess):
    """A peer server (``python -m cvserve.study.peers PEER ...``) in a child process.

    The child starts its own helper processes (LitServe's workers, Ray's daemons) and
    stops them on SIGTERM, which :meth:`stop` sends."""

    peer = ""

    def __init__(
        self,
        onnx: str | Path,
        name: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        meta: str | Path | None = None,
    ) -> None:
        reason = available_peers()[self.peer]
        if reason is not None:
            raise RuntimeError(f"{self.peer} cannot run: {reason}")
        self.command = ("cvserve.study.peers", self.peer)
        super().__init__(onnx, name, port=port, host=host, meta=meta)

    def stop(self, timeout: float = 60.0) -> int | None:
        rc = super().stop(timeout)
        if self.proc is not None:
            try:  # helpers that outlived their parent (it leads their process group)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return rc


class LitServeProcess(_PeerProcess):
    """The model served by LitServe (one worker, batch 1) in a child process."""

    peer = "litserve"


class RayServeProcess(_PeerProcess):
    """The model served by Ray Serve (one replica, batch 1) in a child process."""

    peer = "ray-serve"


def peer_process(peer: str, onnx: str | Path, name: str, **kw: Any) -> ServerProcess:
    """The process class of ``peer`` (a name in :data:`PEERS`), constructed."""
    classes: dict[str, Callable[..., ServerProcess]] = {
        "litserve": LitServeProcess,
        "ray-serve": RayServeProcess,
    }
    if peer not in classes:
        raise ValueError(f"unknown peer {peer!r}; peers: {', '.join(PEERS)}")
    return classes[peer](onnx, name, **kw)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("peer", choices=PEERS)
    p.add_argument("--onnx", required=True, help="the model file")
    p.add_argument("--name", required=True, help="the model name in the URL")
    p.add_argument("--meta", default=None, help="its sidecar (default: model.json beside it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8002)
    a = p.parse_args(argv)
    # Lead a process group of our own: stop() can then end every helper process the
    # framework started (workers, daemons) even if this one dies without cleaning up.
    os.setpgrp()
    if a.peer == "litserve":
        from cvserve.study._litserve import run
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports home
        from cvserve.study._rayserve import run
    run(a.onnx, a.name, a.host, a.port, a.meta)


if __name__ == "__main__":
    main()
