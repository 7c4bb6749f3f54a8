"""Limits before trust on the HTTP door: what a client sends before its request reaches
the app costs a bounded amount of memory, time and descriptors (issue 20, #2 and #3)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from cvserve.config import ModelConfig, ServerConfig
from cvserve.serving.process import ServerThread, free_port

PREDICT = "/v1/models/tiny-resnet:predict"


def _server(cache, **limits) -> ServerThread:
    cfg = ServerConfig(
        port=free_port(),
        cache_dir=str(cache),
        preprocess_threads=1,
        models=(ModelConfig("tiny-resnet"),),
        **limits,
    )
    return ServerThread(cfg).start()


@pytest.fixture(scope="module")
def quick(model_cache):
    """Short timeouts (a test waits for them) and a small connection cap."""
    srv = _server(
        model_cache,
        keep_alive_timeout_ms=500,
        header_timeout_ms=500,
        body_timeout_ms=500,
        max_connections=8,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def default(model_cache):
    """Every limit at its default."""
    srv = _server(model_cache)
    yield srv
    srv.stop()


def _connect(srv: ServerThread, timeout: float = 10) -> socket.socket:
    host, port = srv.url.rsplit("/", 1)[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (socket.timeout if it never does)."""
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_a_huge_header_is_refused_with_431_before_it_is_read_whole(default):
    sock = _connect(default)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
    sent, chunk = 0, b"a" * 65536
    with pytest.raises(OSError):  # the server stops reading long before 64 MB
        while sent < 64 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(chunk)
    response = _read_all(sock)
    sock.close()
    assert sent < 16 * 1024 * 1024  # the limit, a read, and the kernel's buffers
    if response:  # the answer may be lost to the reset of what was still unread
        assert _status(response) == 431, response[:200]
        assert b"65536" in response  # the body says what the limit was
    assert httpx.get(default.url + "/healthz").status_code == 200


def test_a_head_just_over_the_limit_in_one_piece_gets_431(default):
    sock = _connect(default)
    big = b"x" * (64 * 1024)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n")
    response = _read_all(sock)
    sock.close()
    assert _status(response) == 431, response[:200]


def test_too_many_header_fields_get_431(default):
    r = httpx.get(default.url + "/healthz", headers=[(f"X-{i}", str(i)) for i in range(101)])
    assert r.status_code == 431, r.text
    assert r.json()["error"]["limit"] == 100


def test_large_but_ordinary_headers_are_served(default, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    headers = {"content-type": "image/jpeg", "Cookie": "c" * 8000, "X-Token": "t" * 16000}
    headers.update({f"X-{i}": str(i) for i in range(80)})
    r = httpx.post(default.url + PREDICT, content=jpg, headers=headers, timeout=60)
    assert r.status_code == 200, r.text


def test_a_new_connection_that_sends_nothing_is_closed(quick):
    sock = _connect(quick)
    assert _read_all(sock) == b""  # closed by the server (socket.timeout if never)
    sock.close()


def test_a_head_that_never_completes_gets_408(quick):
    sock = _connect(quick)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    stop = threading.Event()

    def trickle() -> None:  # slowloris: a byte now and then, never the end of the head
        while not stop.wait(0.1):
            try:
                sock.sendall(b"X-a: b\r\n")
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        response = _read_all(sock)
    finally:
        stop.set()
        t.join()
        sock.close()
    if response:  # or reset, with the 408 lost to a header still in flight
        assert _status(response) == 408, response[:200]


def test_a_stalled_body_is_closed(quick):
    sock = _connect(quick)
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 1000000\r\n\r\n"
    )
    sock.sendall(head.encode() + b"\xff" * 100_000)
    assert _read_all(sock) == b""  # closed, no answer: the client went quiet
    sock.close()
    assert httpx.get(quick.url + "/healthz").status_code == 200


def test_a_slow_but_steady_upload_succeeds(quick, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    pieces = [jpg[i : i + len(jpg) // 30 + 1] for i in range(0, len(jpg), len(jpg) // 30 + 1)]

    def slowly():
        for piece in pieces:  # 30 pieces 0.05 s apart: longer than the body timeout in all
            time.sleep(0.05)
            yield piece

    t0 = time.monotonic()
    r = httpx.post(
        quick.url + PREDICT, content=slowly(), headers={"content-type": "image/jpeg",
        "content-length": str(len(jpg))}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert time.monotonic() - t0 > 0.5  # the upload outlasted the body timeout


def test_connections_over_the_cap_close_the_idle_ones_and_health_answers(quick):
    idle = [_connect(quick) for _ in range(20)]
    try:
        r = httpx.get(quick.url + "/healthz", timeout=10)
        assert r.status_code == 200
        closed = sum(_read_all(s) == b"" for s in idle)  # each is closed at last
    finally:
        for s in idle:
            s.close()
    assert closed == 20


def test_over_the_cap_with_every_connection_busy_a_new_one_gets_503(quick):
    head = (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).encode()
    busy: list[socket.socket] = []
    stop = threading.Event()

    def keep_sending() -> None:  # bodies under way, never stalled, never finished
        while not stop.wait(0.05):
            for s in busy:
                try:
                    s.send(b"\xff")
                except OSError:
                    pass

    t = threading.Thread(target=keep_sending, daemon=True)
    try:
        for _ in range(8):
            s = _connect(quick)
            s.sendall(head)
            busy.append(s)
        t.start()
        # every connection now has a request under way: the ninth is refused
        for _ in range(50):
            try:
                r = httpx.get(quick.url + "/healthz", timeout=10)
            except httpx.TransportError:
                continue  # the 503 lost to the close: try again
            break
        assert r.status_code == 503, r.text
        assert r.json()["error"]["kind"] == "too_many_connections"
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        for s in busy:
            s.close()


# --- the body budget: bytes of request bodies being received, server-wide --------------
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def budgeted(model_cache):
    """Bodies up to 1 MiB, 2 MiB of them being received at once."""
    srv = _server(model_cache, max_body_bytes=MIB, max_body_bytes_in_flight=2 * MIB)
    yield srv
    srv.stop()


def _upload_head(length: int | None) -> bytes:
    size = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (
        f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n{size}\r\n\r\n"
    ).encode()


def _stalled_upload(srv: ServerThread, length: int) -> socket.socket:
    """A body of ``length`` declared, a tenth of it sent, then nothing; once a request on
    another connection has been answered, the server has read this head."""
    sock = _connect(srv)
    sock.sendall(_upload_head(length) + b"\xff" * (length // 10))
    assert httpx.get(srv.url + "/healthz", timeout=10).status_code == 200
    return sock


def test_a_declared_body_that_does_not_fit_gets_503_before_it_is_sent(budgeted):
    stalled = _stalled_upload(budgeted, MIB)  # holds 1 MiB of the 2
    sock = _connect(budgeted)
    try:
        sock.sendall(_upload_head(600 * 1024))  # 1 MiB + twice 600 KiB > 2 MiB
        response = _read_all(sock)  # answered and closed without a byte of the body
    finally:
        sock.close()
        stalled.close()
    assert _status(response) == 503, response[:300]
    assert b"retry-after: 1" in response.lower()
    assert b"body_budget_full" in response


def test_a_client_that_sends_its_body_at_once_reads_the_503_not_a_reset(budgeted):
    stalled = _stalled_upload(budgeted, MIB)
    sock = _connect(budgeted)
    try:
        body = b"\xff" * (600 * 1024)  # more than the socket buffers hold: unread by the end
        try:
            sock.sendall(_upload_head(len(body)) + body)
        except OSError:
            pass
        response = _read_all(sock)
    finally:
        sock.close()
        stalled.close()
    assert _status(response) == 503, response[:300]
    assert b"retry-after: 1" in response.lower()


def test_a_small_body_is_served_while_a_large_one_stalls(budgeted, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    stalled = _stalled_upload(budgeted, MIB)
    try:
        r = httpx.post(budgeted.url + PREDICT, content=jpg,
                       headers={"content-type": "image/jpeg"}, timeout=30)  # fmt: skip
    finally:
        stalled.close()
    assert r.status_code == 200, r.text


def test_a_chunked_body_that_outgrows_the_room_is_cut_with_503(budgeted):
    stalled = _stalled_upload(budgeted, MIB)
    sock = _connect(budgeted)
    try:
        sock.sendall(_upload_head(None))
        chunk = b"%x\r\n" % (64 * 1024) + b"\xff" * (64 * 1024) + b"\r\n"
        try:
            for _ in range(16):  # 1 MiB: past the half MiB a body may take now
                sock.sendall(chunk)
        except OSError:
            pass  # cut while sending
        response = _read_all(sock)
    finally:
        sock.close()
        stalled.close()
    assert _status(response) == 503, response[:300]
    assert b"body_budget_full" in response


def test_the_budget_is_given_back_when_a_stalled_upload_hangs_up(budgeted):
    stalled = _stalled_upload(budgeted, MIB)
    stalled.close()
    # the same 600 KiB that did not fit next to it fits once the server has seen it go
    # (not an image: 415 from the app, which means it was let in and read)
    body = b"\xff" * (600 * 1024)
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(budgeted.url + PREDICT, content=body,
                       headers={"content-type": "image/jpeg"}, timeout=30)  # fmt: skip
        if r.status_code != 503 or time.monotonic() > deadline:
            break
    assert r.status_code == 415, r.text


def test_a_lone_body_of_the_largest_size_always_fits(model_cache):
    srv = _server(model_cache, max_body_bytes=MIB, max_body_bytes_in_flight=MIB)
    try:
        r = httpx.post(srv.url + PREDICT, content=b"\xff" * MIB,
                       headers={"content-type": "image/jpeg"}, timeout=30)  # fmt: skip
    finally:
        srv.stop()
    assert r.status_code == 415, r.text  # read whole (not an image), not refused


def test_the_body_budget_default_flag_and_config_key():
    from cvserve.cli import build_parser
    from cvserve.config import ConfigError
    from cvserve.config.flags import server_config_from_args

    cfg = ServerConfig(max_body_bytes=MIB)
    assert MIB <= cfg.resolved_body_bytes_in_flight() <= 2 * MIB
    assert ServerConfig(max_body_bytes_in_flight=5 * MIB, max_body_bytes=MIB) \
        .resolved_body_bytes_in_flight() == 5 * MIB  # fmt: skip
    with pytest.raises(ConfigError, match="max_body_bytes_in_flight"):
        ServerConfig(max_body_bytes=2 * MIB, max_body_bytes_in_flight=MIB)
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--max-body-bytes-in-flight", str(64 * MIB)]
    )
    assert server_config_from_args(args).max_body_bytes_in_flight == 64 * MIB


def test_memory_is_given_back_after_large_bodies(monkeypatch):
    import asyncio

    from cvserve.serving import protocol

    trimmed = []
    monkeypatch.setattr(protocol, "_TRIM_DELAY_S", 0.0)

    async def main() -> None:
        budget = protocol.BodyBudget(0, trim=lambda pad: trimmed.append(pad) or 1)
        budget.take(protocol.TRIM_AFTER_BYTES)
        budget.give(protocol.TRIM_AFTER_BYTES // 2)
        await asyncio.sleep(0.05)
        assert trimmed == []  # a small amount let go: no trim
        budget.give(protocol.TRIM_AFTER_BYTES // 2)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if trimmed:
                break
        assert budget.held == 0

    asyncio.run(main())
    assert trimmed == [0]


def test_the_server_returns_memory_once_it_has_grown():
    import asyncio

    from cvserve.serving import server

    mb = 1024 * 1024
    # resident memory: idle, a burst (trimmed back), live growth (kept: no trim again)
    readings = iter([100 * mb, 110 * mb, 300 * mb, 120 * mb, 250 * mb, 250 * mb, 250 * mb])
    trims = []

    def rss() -> int:
        try:
            return next(readings)
        except StopIteration:
            raise asyncio.CancelledError from None

    # given as arguments: patching the module would feed these readings to any other
    # server running in this process too (a fixture's), and race it for them
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(server._return_memory(0.0, rss, lambda pad: trims.append(pad) or 1))
    # 300 MB (mark 100): trimmed, to 120; 250 MB: trimmed, still 250 after it (in use), so
    # 250 is the new mark and is not trimmed again
    assert trims == [0, 0]
