"""The load generator's HTTP/1.1 client: response framing and header parsing, byte by byte."""

from __future__ import annotations

import pytest

from cvserve.bench import _http
from cvserve.trace import format_server_timing, parse_server_timing


class FakeTransport:
    def __init__(self):
        self.written = []
        self.closed = self.aborted = False

    def write(self, data):
        self.written.append(data)

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def make_conn():
    done = []
    conn = _http.Connection(lambda c, *args: done.append(args))
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.keep_body = True
    return conn, transport, done


def feed(conn, data: bytes, step: int | None):
    if step is None:
        conn.data_received(data)
    else:
        for i in range(0, len(data), step):
            conn.data_received(data[i : i + step])


TIMING = format_server_timing({"recv": 0.001, "decode": 0.0025, "infer": 0.010})
BODY = b'{"model":"m","top_k":[],"batch_size": 7}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Server-Timing: {TIMING}\r\n".encode()
    + f"content-length: {len(BODY)}\r\n\r\n".encode()
    + BODY
)


@pytest.mark.parametrize("step", [None, 1, 7, 64])
def test_content_length_response_in_any_pieces(step):
    conn, transport, done = make_conn()
    for _ in range(2):  # keep-alive: the same connection serves the next request
        conn.send(b"GET / HTTP/1.1\r\n\r\n", 1.0)
        feed(conn, RESPONSE, step)
    assert done == [(200, _http.ERR_NONE, TIMING.encode(), 7, None)] * 2
    assert conn.body == BODY and conn.open and not conn.busy and not transport.closed
    stages, bad = parse_server_timing(done[0][2].decode())
    assert bad == 0 and stages == pytest.approx({"recv": 0.001, "decode": 0.0025, "infer": 0.010})


@pytest.mark.parametrize("step", [None, 1, 5])
def test_chunked_response(step):
    conn, _, done = make_conn()
    conn.send(b"x", 0.0)
    parts = [b'{"bat', b'ch_size": 3, "a":', b"1}"]
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts]
    chunks[1] = chunks[1].replace(b"\r\n", b";ext=1\r\n", 1)  # a chunk extension
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(chunks)
        + b"0\r\nTrailer: x\r\n\r\n"
    )
    feed(conn, raw, step)
    assert done == [(200, _http.ERR_NONE, None, 3, None)]
    assert conn.body == b'{"batch_size": 3, "a":1}'


def test_body_until_close_and_connection_close():
    conn, transport, done = make_conn()
    conn.send(b"x", 0.0)
    conn.data_received(b'HTTP/1.0 200 OK\r\n\r\n{"batch_size":2')
    conn.data_received(b"}")
    assert done == []
    conn.connection_lost(None)
    assert done == [(200, _http.ERR_NONE, None, 2, None)] and not conn.open

    conn, transport, done = make_conn()
    conn.send(b"x", 0.0)
    conn.data_received(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert done == [(204, _http.ERR_NONE, None, -1, None)]
    assert transport.closed and not conn.open


def test_error_status_headers():
    conn, _, done = make_conn()
    conn.send(b"x", 0.0)
    body = b'{"error":"queue full","batch_size":4}'
    conn.data_received(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\n"
        b"server-timing: recv;dur=1\r\nSERVER-TIMING: queue;dur=2\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, kind, timing, batch, retry = done[0]
    assert (status, kind, batch, retry) == (429, _http.ERR_NONE, -1, 2.0)  # no batch on errors
    assert parse_server_timing(timing.decode()) == ({"recv": 0.001, "queue": 0.002}, 0)


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",  # more than announced
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_response_is_a_protocol_error(raw):
    conn, transport, done = make_conn()
    conn.send(b"x", 0.0)
    conn.data_received(raw)
    assert done == [(0, _http.ERR_PROTOCOL, None, -1, None)]
    assert transport.aborted and not conn.open


def test_connection_lost_mid_response_and_unsolicited_bytes():
    conn, _, done = make_conn()
    conn.send(b"x", 0.0)
    conn.data_received(RESPONSE[:30])
    conn.connection_lost(ConnectionResetError())
    assert done == [(0, _http.ERR_PROTOCOL, None, -1, None)]

    conn, transport, done = make_conn()
    conn.data_received(b"HTTP/1.1 200 OK\r\n")  # nothing was asked
    assert done == [] and transport.aborted


def test_target_from_url():
    t = _http.Target.from_url("http://example.org:8080/base/")
    assert (t.host, t.port, t.prefix) == ("example.org", 8080, "/base")
    assert _http.Target.from_url("localhost:9").port == 9
    req = t.predict_request("resnet 50", b"abc", "image/jpeg")
    assert req.startswith(b"POST /base/v1/models/resnet%2050:predict HTTP/1.1\r\n")
    assert b"\r\nHost: example.org:8080\r\n" in req
    assert b"\r\nContent-Length: 3\r\n" in req and req.endswith(b"\r\n\r\nabc")
    with pytest.raises(ValueError, match="http:// or https://"):
        _http.Target.from_url("ftp://example.org")
    s = _http.Target.from_url("https://example.org", api_key="k", insecure=True)
    assert s.port == 443 and s.tls is not None and s.authority == "example.org"
    assert b"\r\nAuthorization: Bearer k\r\n" in s.request("GET", "/v1/models")
    assert _http.Target.from_url("http://example.org").tls is None
    with pytest.raises(ValueError, match="one non-empty line"):
        _http.Target.from_url("http://example.org", api_key="a\r\nX-Evil: 1")
    with pytest.raises(ValueError, match="needs an https"):
        _http.Target.from_url("http://example.org", insecure=True)
