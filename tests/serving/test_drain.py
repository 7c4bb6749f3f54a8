"""Shutdown that loses nothing: real server processes, real signals, real keep-alive
connections. No client may see a transport error other than a refused connection (the
request never left), and with ``--reuse-port`` not even that."""

from __future__ import annotations

import http.client
import socket
import threading

import httpx
from served import MODEL, PREDICT, SLOW, Served, wait_for

from cvserve.serving.process import free_port


def _photos(data_dir) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_dir / "images" / "medium").glob("*.jpg"))]


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def _outcome(c: httpx.Client, body: bytes) -> str:
    try:
        return str(
            c.post(PREDICT, content=body, headers={"content-type": "image/jpeg"}).status_code
        )
    except httpx.ConnectError:
        return "refused"  # never accepted: nothing was sent
    except httpx.TransportError as e:
        return f"lost:{type(e).__name__}"  # sent, and no answer came


def test_sigterm_under_load_answers_every_request(model_cache, data_dir, tmp_path):
    images = _photos(data_dir)
    with Served(tmp_path, model_cache, "--max-batch-size", "4", "--max-delay-ms", "10") as srv:
        srv.wait_ready()
        outcomes: list[str] = []
        lock = threading.Lock()
        sent = threading.Semaphore(0)

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for i in range(400):
                    what = _outcome(c, images[(k + i) % len(images)])
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
        srv.sigterm()
        for t in threads:
            t.join(60)
        assert srv.wait(60) == 0
    assert not [o for o in outcomes if o.startswith("lost")], outcomes
    assert set(outcomes) <= {"200", "503", "refused"}
    assert outcomes[:before] == ["200"] * before
    # Every client went on until the server told it to go (503) or stopped listening.
    assert outcomes.count("503") + outcomes.count("refused") == 8


def test_drain_delay_serves_new_work_while_readiness_fails(model_cache, data_dir, tmp_path):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with Served(tmp_path, model_cache, "--drain-delay", "4") as srv:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post(PREDICT, content=jpg)
            assert r.status_code == 200 and "connection" not in r.headers  # keep-alive
            srv.sigterm()
            wait_for(lambda: httpx.get(srv.url + "/readyz").status_code == 503, 10, "not ready")
            assert httpx.get(srv.url + "/readyz").json()["reason"] == "draining"
            assert httpx.get(srv.url + "/v2/health/ready").status_code == 503
            assert httpx.get(srv.url + "/healthz").status_code == 200  # alive all along
            # not ready, and still serving: on the kept-alive connection and on a new one
            for client in (c, httpx.Client(base_url=srv.url, timeout=30)):
                r = client.post(PREDICT, content=jpg)
                assert r.status_code == 200 and r.json()["top_k"]
                assert r.headers["connection"] == "close"  # go and find another replica
        assert srv.wait(60) == 0
        assert _refused(srv.port)
        assert srv.lines("stopping: not ready; serving new work for 4 s more")


def test_open_connections_get_503_with_connection_close_not_a_reset(
    model_cache, data_dir, tmp_path
):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with Served(tmp_path, model_cache, *SLOW) as srv:
        srv.wait_ready()
        busy = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in "ab"]
        kept = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        idle = socket.create_connection(("127.0.0.1", srv.port))
        for conn in (*busy, kept):  # keep-alive connections with an answer behind them
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"ok"}'
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b'{"status":"ok"}'):  # the head and the body may come apart
            more = idle.recv(4096)
            assert more, got
            got += more
        assert b"200 OK" in got
        answers: list[http.client.HTTPResponse] = []

        def slow(conn: http.client.HTTPConnection) -> None:
            conn.request("POST", PREDICT, body=jpg, headers={"content-type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            answers.append(resp)

        # Two requests one after the other on the accelerator: 3 s in flight in all.
        inflight = [threading.Thread(target=slow, args=(conn,)) for conn in busy]
        for t in inflight:
            t.start()
        queued = f'cvserve_queue_depth{{model="{MODEL}"}} 2.0'
        wait_for(lambda: queued in httpx.get(srv.url + "/metrics").text, 30, "requests in flight")
        srv.sigterm()
        # (no connection attempt here: the closing listener drops new handshakes)
        wait_for(lambda: srv.lines("draining: 2 requests in flight"), 30, "the drain")
        # New work on a connection that is still open: told to go, and the connection
        # closed after the answer, not reset under the request.
        kept.request("POST", PREDICT, body=jpg, headers={"content-type": "image/jpeg"})
        r = kept.getresponse()
        assert r.status == 503 and r.getheader("connection") == "close"
        assert b'"kind":"draining"' in r.read()
        for t in inflight:
            t.join(60)
        assert [a.status for a in answers] == [200, 200]  # in flight at SIGTERM: answered
        assert all(a.getheader("connection") == "close" for a in answers)
        assert srv.wait(60) == 0
        # The idle keep-alive connection was closed with a FIN, not a reset.
        idle.settimeout(10)
        assert idle.recv(4096) == b""
        idle.close()


def test_rolling_restart_on_a_shared_port_loses_nothing(model_cache, data_dir, tmp_path):
    """A replacement joins the port (SO_REUSEPORT) once loaded; then the old one drains."""
    images = _photos(data_dir)
    port = free_port()
    flags = ("--reuse-port", "--drain-delay", "1", "--max-batch-size", "4", "--metrics-port")
    outcomes: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            i = k
            while not stop.is_set():
                what = _outcome(c, images[i % len(images)])
                with lock:
                    outcomes.append(what)
                i += 1

    def replica(name: str) -> Served:
        (tmp_path / name).mkdir()
        metrics = free_port()
        srv = Served(tmp_path / name, model_cache, *flags, str(metrics), port=port)
        srv.url = f"http://127.0.0.1:{metrics}"  # this replica's own readiness
        return srv

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    old, new = replica("old"), None
    try:
        old.wait_ready()
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 20, 60, "load")
        new = replica("new").wait_ready()
        old.sigterm()
        assert old.wait(60) == 0
        n = len(outcomes)
        wait_for(lambda: len(outcomes) >= n + 20, 60, "load on the replacement")
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(60)
        old.stop()
        if new is not None:
            new.stop()
    assert set(outcomes) == {"200"}, {o: outcomes.count(o) for o in set(outcomes)}
