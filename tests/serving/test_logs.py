"""Request ids and quiet, useful logs, read from a real server process's output: one line
per failed request, decoder warnings inside it (the right request's, under concurrency),
nothing printed for a request that succeeded."""

from __future__ import annotations

import asyncio
import re

import grpc
import httpx
import pytest
from served import PREDICT, Served, wait_for

from cvserve.serving.process import free_port
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc

JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def server(model_cache, tmp_path_factory):
    gport = free_port()
    srv = Served(tmp_path_factory.mktemp("logs"), model_cache, "--grpc-port", str(gport))
    srv.grpc_target = f"127.0.0.1:{gport}"
    yield srv.wait_ready()
    srv.stop()


@pytest.fixture(scope="module")
def exif_bad(data_dir) -> bytes:
    """Corrupt EXIF (Pillow warns) and the pixel data cut short (400)."""
    return (data_dir / "bad" / "hopper_bad_exif.jpg").read_bytes()[:3000]


def _line(srv: Served, rid: str) -> str:
    wait_for(lambda: srv.lines(f"id={rid} "), 10, f"the line of {rid}")
    lines = srv.lines(f"id={rid} ")
    assert len(lines) == 1, lines
    return lines[0]


def _fields(line: str) -> dict[str, str]:
    text = line.split("request_failed ", 1)[1]
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', text)}


def test_request_ids_are_echoed_or_made(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert (
            c.get("/healthz", headers={"x-request-id": "abc.123-X"}).headers["x-request-id"]
            == "abc.123-X"
        )
        made = {c.get("/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(made) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", m) for m in made)
        for unusable in ("has spaces", "x" * 129, 'quote"d'):
            got = c.get("/healthz", headers={"x-request-id": unusable}).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{16}", got), unusable


def test_one_line_per_failed_request(server, data_dir):
    bad = data_dir / "bad"
    cases = {
        "f-trunc": (PREDICT, (bad / "truncated_jpeg.jpg").read_bytes(), 400, "undecodable_image"),
        "f-12bit": (PREDICT, (bad / "monkey12.jpg").read_bytes(), 415, "unsupported_media_type"),
        "f-big": (PREDICT, (bad / "max_size.jpg").read_bytes(), 413, "image_too_large"),
        "f-none": ("/v1/models/nope:predict", b"x", 404, "model_not_found"),
        "f-v2": ("/v2/models/tiny-resnet/infer", b"{", 400, "bad_request"),
    }
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for rid, (path, body, status, _) in cases.items():
            r = c.post(path, content=body, headers={**JPEG, "x-request-id": rid})
            assert r.status_code == status and r.headers["x-request-id"] == rid
        ok = c.post(PREDICT, content=(data_dir / "images/small/dog.jpg").read_bytes(),
                    headers={**JPEG, "x-request-id": "f-ok"})  # fmt: skip
        assert ok.status_code == 200
    for rid, (_, _, status, kind) in cases.items():
        f = _fields(_line(server, rid))
        assert f["status"] == str(status) and f["kind"] == kind and f["message"], f
        assert f["door"] == "http"
    assert _fields(_line(server, "f-none"))["model"] == "nope"
    assert "not decode" in _fields(_line(server, "f-trunc"))["message"]
    assert not server.lines("id=f-ok ")  # a success leaves no line
    assert "Traceback" not in server.output()


def test_decoder_warnings_go_into_their_own_requests_line(server, data_dir, exif_bad):
    plain_bad = (data_dir / "bad" / "truncated_jpeg.jpg").read_bytes()
    warned_ok = (data_dir / "bad" / "hopper_bad_exif.jpg").read_bytes()
    bodies = {f"w-exif-{i}": exif_bad for i in range(6)}
    bodies |= {f"w-plain-{i}": plain_bad for i in range(6)}
    bodies |= {f"w-ok-{i}": warned_ok for i in range(4)}

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(*(
                c.post(PREDICT, content=b, headers={**JPEG, "x-request-id": rid})
                for rid, b in bodies.items()
            ))  # fmt: skip

    codes = {r.headers["x-request-id"]: r.status_code for r in asyncio.run(burst())}
    assert codes == {rid: 200 if "-ok-" in rid else 400 for rid in bodies}
    for rid in bodies:
        if "-ok-" in rid:
            assert not server.lines(f"id={rid} ")  # warned, and succeeded: quiet
            continue
        f = _fields(_line(server, rid))
        if "-exif-" in rid:
            assert f["warnings"].startswith("UserWarning: Corrupt EXIF data"), f
        else:
            assert "warnings" not in f, f  # another request's warning never lands here
    # Pillow's warning is printed nowhere else.
    stray = [
        line for line in server.output().splitlines()
        if "Corrupt EXIF" in line and "request_failed" not in line
    ]  # fmt: skip
    assert not stray, stray


def test_grpc_failures_have_their_line_too(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelMetadata(
                pb.ModelMetadataRequest(name="nope"),
                metadata=(("x-request-id", "g-nf"),),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "g-nf") in tuple(e.value.initial_metadata())
    f = _fields(_line(server, "g-nf"))
    assert (f["door"], f["status"], f["model"]) == ("grpc", "NOT_FOUND", "nope")
    assert "nope" in f["message"]


def test_a_flood_of_refusals_is_throttled_per_kind(server):
    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(*(
                c.post("/v1/models/no-such-model:predict", content=b"x",
                       headers={**JPEG, "x-request-id": f"flood-{i}"})
                for i in range(80)
            ))  # fmt: skip

    assert {r.status_code for r in asyncio.run(flood())} == {404}
    wait_for(lambda: len(server.lines("model=no-such-model")) >= 50, 10, "50 lines")
    assert len(server.lines("model=no-such-model")) == 50  # the rest left out, and counted


def test_throttle_counts_what_it_left_out():
    from cvserve.serving.logs import _Throttle

    t = _Throttle(burst=2, window_s=10.0)
    key = ("http", "m", 429)
    assert [t.admit(key, 0.0), t.admit(key, 1.0), t.admit(key, 2.0), t.admit(key, 3.0)] == [
        0, 0, None, None,
    ]  # fmt: skip
    assert t.admit(("http", "m", 400), 3.0) == 0  # another kind has its own budget
    assert t.admit(key, 10.5) == 2  # a new window: the first line says 2 were left out
    assert t.admit(key, 10.6) == 0


def _hang_up_mid_body(server: Served, path: str, rid: str) -> None:
    """Send the headers and a tenth of the declared body, then close the connection."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\n"
            f"content-length: 100000\r\nx-request-id: {rid}\r\n\r\n".encode()
            + b"\xff" * 10_000
        )


def _requests_by_status(server: Served) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "cvserve_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
    return out


def test_a_client_that_hangs_up_mid_body_is_its_own_fault(server):
    """Issue 20 #4: not a 500 with a traceback at ERROR, not counted as status 500."""
    before = _requests_by_status(server)
    _hang_up_mid_body(server, PREDICT, "hup-v1")
    _hang_up_mid_body(server, "/v2/models/tiny-resnet/infer", "hup-v2")
    for rid in ("hup-v1", "hup-v2"):
        f = _fields(_line(server, rid))
        assert (f["status"], f["kind"], f["door"]) == ("499", "client_closed_request", "http"), f
    after = _requests_by_status(server)
    assert after.get("499", 0) - before.get("499", 0) == 2
    assert after.get("500", 0) == before.get("500", 0)
    assert "Traceback" not in server.output() and "ERROR" not in server.output()


def test_a_grpc_message_that_does_not_parse_has_its_line(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, out
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff", metadata=(("x-request-id", "g-junk"),), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    f = _fields(_line(server, "g-junk"))
    assert (f["door"], f["status"]) == ("grpc", "INVALID_ARGUMENT") and "protobuf" in f["message"]
