"""Start-up fails fast and says why; while the models load, the server answers health and
says it is not ready."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest
from served import PREDICT, SLOW, Served, wait_for

from cvserve.serving.process import free_port


@pytest.fixture
def taken():
    """A port some other process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("door", ["--port", "--metrics-port", "--grpc-port"])
def test_a_port_in_use_is_a_one_line_error_before_any_model_loads(door, taken, tmp_path):
    cache = tmp_path / "cache"  # empty: a model that loaded would have been built here
    cache.mkdir()
    ports = {"--port": str(free_port()), door: str(taken)}
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "serve", "--model", "tiny-resnet",
         "--cache-dir", str(cache), *(x for kv in ports.items() for x in kv)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{taken}" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not any(cache.iterdir()), "the model was built before the port was checked"
    assert "building" not in r.stderr and "ready on" not in r.stderr


def test_while_loading_health_answers_and_work_gets_503(model_cache, data_dir, tmp_path):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    # The simulated accelerator takes 3 s a batch: warming the model up (one run per batch
    # size, here only 1) takes a while.
    slow_load = [*SLOW[:3], "1:3000", *SLOW[4:]]
    with Served(tmp_path, model_cache, *slow_load) as srv:
        seen: dict[str, httpx.Response] = {}

        def loading() -> bool:
            assert srv.proc.poll() is None, srv.output()
            try:
                r = httpx.get(srv.url + "/readyz", timeout=5)
            except httpx.TransportError:
                return False  # not listening yet (the interpreter is starting)
            if r.status_code == 200:
                raise AssertionError("ready before a loading answer was seen")
            seen["readyz"] = r
            seen["healthz"] = httpx.get(srv.url + "/healthz", timeout=5)
            seen["live"] = httpx.get(srv.url + "/v2/health/live", timeout=5)
            seen["v2ready"] = httpx.get(srv.url + "/v2/health/ready", timeout=5)
            seen["predict"] = httpx.post(srv.url + PREDICT, content=jpg, timeout=5)
            seen["v2infer"] = httpx.post(srv.url + "/v2/models/tiny-resnet/infer", json={})
            return True

        wait_for(loading, 60, "the server listening")
        assert seen["readyz"].status_code == 503
        assert seen["readyz"].json() == {"ready": False, "reason": "loading"}
        assert seen["healthz"].status_code == 200 and seen["live"].status_code == 200
        assert seen["v2ready"].status_code == 503
        r = seen["predict"]
        assert r.status_code == 503 and r.json()["error"]["kind"] == "loading"
        assert r.headers["retry-after"] == "1"
        assert seen["v2infer"].status_code == 503 and "loading" in seen["v2infer"].json()["error"]
        srv.wait_ready()
        r = httpx.post(srv.url + PREDICT, content=jpg, timeout=30)
        assert r.status_code == 200 and r.json()["top_k"]
