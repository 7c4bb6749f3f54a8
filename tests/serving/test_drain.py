"""SIGTERM under load: new work gets 503, every accepted request is answered, then exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from cvserve.serving.server import free_port


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server never became ready")


def test_sigterm_drains_without_losing_accepted_requests(model_cache, data_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvserve", "serve", "--model", "tiny-resnet", "--port", str(port),
         "--cache-dir", str(model_cache), "--max-batch", "4", "--max-delay-ms", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_ready(url, proc)
        images = [p.read_bytes() for p in sorted((data_dir / "images" / "medium").glob("*.jpg"))]
        outcomes: list[str] = []
        lock = threading.Lock()
        sent = threading.Semaphore(0)

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                for i in range(200):
                    try:
                        r = c.post(
                            "/v1/models/tiny-resnet:predict", content=images[(k + i) % len(images)]
                        )
                        what = str(r.status_code)
                    except httpx.ConnectError:
                        what = "refused"  # never accepted: the listener is gone
                    except httpx.TransportError as e:
                        what = f"lost:{type(e).__name__}"  # accepted, then no answer
                    with lock:
                        outcomes.append(what)
                    sent.release()
                    if what in ("503", "refused"):
                        return

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for _ in range(24):  # let load build up
            assert sent.acquire(timeout=60)
        with lock:
            before = len(outcomes)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    lost = [o for o in outcomes if o.startswith("lost")]
    assert not lost, lost
    assert set(outcomes) <= {"200", "503", "refused"}
    assert "503" in outcomes  # new work during the drain was told to go elsewhere
    assert outcomes[:before].count("200") == before
    # Every client stopped on a 503 or a refused connection: drain answered them all.
    assert outcomes.count("503") + outcomes.count("refused") == 8
