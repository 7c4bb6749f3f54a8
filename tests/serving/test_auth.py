"""API keys on a real server process, over HTTP and gRPC: 401 without a key, 403 with a
wrong one, health and readiness open, and the keys never in the logs (even with -v)."""

from __future__ import annotations

import grpc
import httpx
import pytest
from served import MODEL, PREDICT, Served

from cvserve.serving.process import free_port
from cvserve.serving.v2.grpc import encode_bytes
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc

KEYS = ("k3y-0ne-5ecret-aaaaaaaaaaaa", "k3y-tw0-5ecret-bbbbbbbbbbbb")


@pytest.fixture(scope="module")
def secured(model_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# API keys of the test server\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    gport = free_port()
    srv = Served(tmp, model_cache, "--api-key-file", str(key_file), "--grpc-port", str(gport),
                 verbose=True)  # fmt: skip
    srv.grpc_target = f"127.0.0.1:{gport}"
    yield srv.wait_ready()
    srv.stop()
    out = srv.output()
    assert not any(k in out for k in KEYS), "an API key reached the log"
    assert not any(k[:12] in out for k in KEYS)


def _edge_refusals(text: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.labels["status"], s.labels["kind"]): s.value
        for fam in text_string_to_metric_families(text) if fam.name == "cvserve_edge_refusals"
        for s in fam.samples if s.name.endswith("_total")
    }  # fmt: skip


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_http_needs_a_key_and_says_which_status(secured, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with httpx.Client(base_url=secured.url, timeout=30) as c:
        r = c.post(PREDICT, content=jpg, headers={"x-request-id": "no-key-1"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["kind"] == "unauthorized"
        assert r.headers["x-request-id"] == "no-key-1"
        for bad in ("Basic " + KEYS[0], "Bearer", KEYS[0]):  # not a bearer key: 401
            assert c.post(PREDICT, content=jpg, headers={"authorization": bad}).status_code == 401
        r = c.post(PREDICT, content=jpg, headers=_bearer(KEYS[0] + "x"))
        assert r.status_code == 403 and r.json()["error"]["kind"] == "forbidden"
        assert c.post(PREDICT, content=jpg, headers=_bearer(KEYS[0][:-1])).status_code == 403
        for key in KEYS:
            r = c.post(PREDICT, content=jpg, headers=_bearer(key))
            assert r.status_code == 200 and r.json()["top_k"]
        r = c.post(PREDICT, content=jpg, headers={"authorization": f"bearer   {KEYS[1]}"})
        assert r.status_code == 200  # the scheme is case-insensitive
        for path in ("/v1/models", "/metrics", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready",
                     "/nowhere"):  # fmt: skip
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=_bearer(KEYS[1])).status_code in (200, 404), path
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path  # probes need no key
        refused = _edge_refusals(c.get("/metrics", headers=_bearer(KEYS[0])).text)
        assert refused[("401", "unauthorized")] >= 9 and refused[("403", "forbidden")] >= 2
    lines = secured.lines("id=no-key-1")
    assert len(lines) == 1 and "status=401" in lines[0] and "kind=unauthorized" in lines[0]


def test_grpc_needs_a_key_too(secured, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with grpc.insecure_channel(secured.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live  # open
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # open
        meta = pb.ModelMetadataRequest(name=MODEL)
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Basic {KEYS[0]}"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Bearer {KEYS[0]}0"),), grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelMetadata(meta, metadata=metadata, timeout=10)
            assert e.value.code() == code
        reply, call = stub.ModelMetadata.with_call(
            meta, metadata=(("authorization", f"Bearer {KEYS[1]}"), ("x-request-id", "g-1")),
            timeout=10,
        )  # fmt: skip
        assert reply.name == MODEL
        assert ("x-request-id", "g-1") in tuple(call.initial_metadata())
        infer = pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(name="IMAGE", datatype="BYTES", shape=[1])
            ],
            raw_input_contents=[encode_bytes([jpg])],
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(infer, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = stub.ModelInfer(infer, metadata=(("authorization", f"Bearer {KEYS[0]}"),), timeout=30)
        assert out.model_name == MODEL and out.outputs
    assert secured.lines("door=grpc") and all(
        "status=UNAUTHENTICATED" in line or "status=PERMISSION_DENIED" in line
        for line in secured.lines("request_failed id=") if "door=grpc" in line
    )  # fmt: skip


def _bench(url: str, data_dir, **kw):
    from cvserve.bench import BenchConfig, run_bench

    return run_bench(BenchConfig(
        url=url, model=MODEL, images=str(data_dir / "images" / "small" / "dog.jpg"),
        concurrency=[2], requests=6, warmup=0.0, **kw,
    ))  # fmt: skip


def test_bench_sends_the_key_and_never_records_it(secured, data_dir, tmp_path):
    from cvserve.bench import save_result

    for protocol, extra in (("v1", {}), ("v2-http", {}),
                            ("v2-grpc", {"grpc_target": secured.grpc_target})):  # fmt: skip
        res = _bench(secured.url, data_dir, api_key=KEYS[1], protocol=protocol, **extra)
        assert res.points[0].errors["by_status"] == {}, protocol  # every answer a 200
        assert res.points[0].ok == 6, protocol
    without = _bench(secured.url, data_dir)
    assert without.points[0].errors["by_status"] == {"401": 6}
    out = save_result(res, tmp_path / "bench.json")
    assert res.config["api_key"] == "(set)"
    assert not any(k.encode() in p.read_bytes() for k in KEYS for p in tmp_path.iterdir())
    assert out.exists()


def test_bench_cli_reads_the_key_from_a_file(secured, data_dir, tmp_path, monkeypatch):
    from cvserve.cli import main

    key_file = tmp_path / "key"
    key_file.write_text(f"\n{KEYS[0]}\n")
    img = str(data_dir / "images" / "small" / "dog.jpg")
    out = tmp_path / "r.json"
    args = ["bench", "--url", secured.url, "--model", MODEL, "--images", img,
            "--requests", "3", "--warmup-ms", "0", "--out", str(out)]  # fmt: skip
    assert main([*args, "--api-key-file", str(key_file)]) == 0
    import json

    doc = json.loads(out.read_text())
    assert doc["points"][0]["errors"]["total"] == 0
    monkeypatch.setenv("CVSERVE_API_KEY", KEYS[1])
    assert main(args) == 0
    assert json.loads(out.read_text())["points"][0]["errors"]["total"] == 0
    (tmp_path / "empty").write_text("\n")
    assert main([*args, "--api-key-file", str(tmp_path / "empty")]) == 2


def test_the_key_is_checked_before_the_message_is_read(secured):
    """Issue 20 #1 and #10: a keyless call is refused on its metadata alone, so its message
    (here bytes that are no protobuf) is never parsed; with a key, such bytes are
    INVALID_ARGUMENT, not UNKNOWN."""
    with grpc.insecure_channel(secured.grpc_target) as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, out
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Bearer {KEYS[0]}0"),), grpc.StatusCode.PERMISSION_DENIED),
            ((("authorization", f"Bearer {KEYS[0]}"),), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.RpcError) as e:
                raw(b"\xff\xff\xff\xff not a protobuf", metadata=metadata, timeout=10)
            assert e.value.code() == code, e.value.details()


# --- the key file -------------------------------------------------------------------------
def test_a_byte_order_mark_is_not_part_of_the_key(tmp_path):
    from cvserve.serving.auth import ApiKeys

    f = tmp_path / "keys"
    f.write_bytes(b"\xef\xbb\xbf" + KEYS[0].encode() + b"\n")
    f.chmod(0o600)
    assert ApiKeys.from_file(f).check(f"Bearer {KEYS[0]}") is None


@pytest.mark.parametrize("key", ["clé-secrète-0123456789", "ключ-0123456789", "tab\x07bell"])
def test_a_key_no_header_can_carry_is_refused_at_start(tmp_path, key):
    from cvserve.config import ConfigError
    from cvserve.serving.auth import ApiKeys

    f = tmp_path / "keys"
    f.write_text(f"{KEYS[0]}\n{key}\n", encoding="utf-8")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="key 2 .*not printable ASCII"):
        ApiKeys.from_file(f)


def test_a_key_file_others_can_read_is_warned_about(tmp_path, caplog):
    from cvserve.serving.auth import ApiKeys

    f = tmp_path / "keys"
    f.write_text(KEYS[0] + "\n")
    for mode, warned in ((0o600, False), (0o400, False), (0o640, True), (0o644, True)):
        f.chmod(mode)
        caplog.clear()
        with caplog.at_level("WARNING", logger="cvserve.serving.auth"):
            ApiKeys.from_file(f)
        assert any("chmod 600" in r.getMessage() for r in caplog.records) == warned, oct(mode)
        assert not any(KEYS[0][:8] in r.getMessage() for r in caplog.records)
