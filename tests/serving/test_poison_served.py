"""A poison image beside 7 good ones, through a real server: the runtime fails on the
poison's input row, the 7 get their own answers (200), the poison a 500 naming it."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
from served import wait_for

from cvserve.images.preprocess import Preprocessor
from cvserve.models import store
from cvserve.runtime.onnx import OrtRuntime
from cvserve.tasks.base import get_head

PREDICT = "/v1/models/tiny-resnet:predict"


class PoisonOn:
    """Wraps a served runtime's ``run``: a call holding ``poison`` (one input row) raises,
    as a runtime does on an input it cannot run; the first call waits for ``gate``."""

    def __init__(self, run, poison: np.ndarray, gate: threading.Event) -> None:
        self.inner, self.poison, self.gate = run, poison, gate
        self.calls: list[tuple[int, bool]] = []  # (rows, held the poison)

    def __call__(self, batch: np.ndarray):
        if not self.calls:
            assert self.gate.wait(30)
        bad = any(np.array_equal(row, self.poison) for row in batch)
        self.calls.append((batch.shape[0], bad))
        if bad:
            raise RuntimeError("kernel fault on this input")
        return self.inner(batch)


def _alone(cache, data: bytes) -> list[dict]:
    """The image's result computed alone: batch of one, no server."""
    meta = store.load_meta("tiny-resnet", cache)
    x = np.empty((1, *meta.preprocess.input_shape), np.float32)
    m = Preprocessor(meta.preprocess).run(data, x[0])
    rt = OrtRuntime(store.model_path(meta, cache))
    return get_head(meta).postprocess([o[0] for o in rt.run(x)], m)["top_k"]


def test_a_poison_image_beside_seven_good_ones(server_factory, model_cache, distinct_images):
    srv = server_factory(model_cache, max_batch_size=8, max_delay_ms=60_000, max_queue=64)
    try:
        ms = srv.state.models["tiny-resnet"]
        good, poison = distinct_images[:7], distinct_images[7]
        row = np.empty(ms.input_shape, ms.input_dtype)
        Preprocessor(ms.spec).run(poison, row)
        gate = threading.Event()
        (runtime,) = ms._runtimes
        runtime.run = wrapper = PoisonOn(runtime.run, row, gate)
        bodies = [*good[:3], poison, *good[3:]]

        async def main():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                first = asyncio.ensure_future(client.post(PREDICT, content=good[0]))
                # the first request holds the instance; the next 8 fill one batch behind it
                await asyncio.to_thread(wait_for, lambda: ms.batcher.busy_instances == 1)
                rest = [asyncio.ensure_future(client.post(PREDICT, content=b)) for b in bodies]
                b = ms.batcher
                await asyncio.to_thread(
                    wait_for, lambda: len(b._closed) == 1 and b._closed[0].pending == 0
                )
                gate.set()
                return await first, await asyncio.gather(*rest)

        first, got = asyncio.run(main())
    finally:
        srv.stop()
    assert first.status_code == 200
    assert wrapper.calls[:2] == [(1, False), (8, True)]  # the poison rode with 7 others
    for body, r in zip(bodies, got, strict=True):
        if body is poison:
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["kind"] == "inference_failed"
            assert "failed on this input" in err["message"]
            assert "kernel fault on this input" in err["message"]
            continue
        assert r.status_code == 200, r.text
        want = _alone(model_cache, body)
        top = r.json()["top_k"]
        assert [t["index"] for t in top] == [t["index"] for t in want]
        np.testing.assert_allclose(
            [t["score"] for t in top], [t["score"] for t in want], rtol=1e-4, atol=1e-6
        )
    # one run of the poison alone; at most two reruns per halving of 8
    assert wrapper.calls.count((1, True)) == 1 and len(wrapper.calls) <= 2 + 6
