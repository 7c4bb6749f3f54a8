"""The per-request rules every door shares (``serving/door.py``), on a stand-in servable:
the status each outcome counts as, where heavy encoding runs, the deadline rule."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cvserve.config import ServerConfig
from cvserve.serving.core import PreprocessPool
from cvserve.serving.door import deadline_s, handle
from cvserve.serving.errors import BadRequest, ClientGone, NotServed
from cvserve.serving.state import ServerState


class _Stats:
    def __init__(self) -> None:
        self.records: list[bool] = []

    def record(self, stages, ok: bool, inferences: int = 1) -> None:
        self.records.append(ok)


class _Servable:
    name = "m"
    timeout_ms = 1000.0
    ready = True

    def __init__(self, heavy: bool = False) -> None:
        self.heavy = heavy
        self.stats = _Stats()


def _run(state: ServerState, servable: _Servable, *, receive=None, encode=None, name="m"):
    targets = {"m": servable}

    def find():
        if name not in targets:
            raise NotServed(f"no model {name!r}")
        return targets[name]

    async def default_receive():
        return b"x"

    async def run(target, data, trace, deadline):
        return {"data": data}, 2

    return asyncio.run(
        handle(
            state, name, targets, find, receive or default_receive, run, encode or (lambda r: r)
        )  # fmt: skip
    )


def _counted(state: ServerState) -> dict[tuple[str, str], float]:
    return {
        (s.labels["model"], s.labels["status"]): s.value
        for fam in state.metrics.registry.collect() if fam.name == "cvserve_requests"
        for s in fam.samples if s.name.endswith("_total")
    }  # fmt: skip


@pytest.fixture
def state():
    s = ServerState(ServerConfig(), pool=PreprocessPool(2))
    s.loading = False
    yield s
    s.pool.shutdown()


def test_each_outcome_is_counted_once_with_its_status(state):
    m = _Servable()
    assert _run(state, m).status == 200
    assert _run(state, m, name="nope").status == 404

    async def hang_up():
        raise ClientGone("gone")

    gone = _run(state, m, receive=hang_up)
    assert gone.status == 499 and isinstance(gone.error, ClientGone)

    def broken(result):
        raise RuntimeError("encoder bug")

    fault = _run(state, m, encode=broken)
    assert fault.status == 500 and fault.message == "internal error: encoder bug"
    state.begin_drain()
    assert _run(state, m).status == 503
    assert _counted(state) == {
        ("m", "200"): 1, ("_unknown", "404"): 1, ("m", "499"): 1, ("m", "500"): 1,
        ("m", "503"): 1,
    }  # fmt: skip
    assert m.stats.records == [True, False, False, False]
    assert state.inflight == 0


def test_heavy_answers_are_encoded_on_the_pool(state):
    threads = []

    def encode(result):
        threads.append(threading.current_thread().name)
        return result

    _run(state, _Servable(heavy=False), encode=encode)
    answer = _run(state, _Servable(heavy=True), encode=encode)
    assert answer.status == 200 and answer.body == {"data": b"x"}
    assert not threads[0].startswith("preprocess") and threads[1].startswith("preprocess")
    assert "encode" in answer.trace.stages


def test_the_deadline_rule():
    assert deadline_s(None, 250.0) == 0.25  # the servable's default
    assert deadline_s("1500", 250.0) == 1.5  # X-Timeout-Ms
    assert deadline_s(0.75, 250.0) == 0.75  # a gRPC client's own deadline
    for bad in ("0", "-3", "nan", "abc", "3600001"):
        with pytest.raises(BadRequest, match="x-timeout-ms"):
            deadline_s(bad, 250.0)
