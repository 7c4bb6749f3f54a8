"""TLS on a real server process (HTTP and gRPC, one certificate), and metrics on a plain
port of their own."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import grpc
import httpx
import pytest
from served import MODEL, PREDICT, Served

from cvserve.bench import ServerUnreachable
from cvserve.serving.process import free_port
from cvserve.serving.v2.proto import inference_pb2 as pb
from cvserve.serving.v2.proto import inference_pb2_grpc as pb_grpc


def self_signed(tmp_path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cvserve test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def tls_server(model_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp)
    gport, mport = free_port(), free_port()
    srv = Served(tmp, model_cache, "--tls-cert", cert, "--tls-key", key,
                 "--grpc-port", str(gport), "--metrics-port", str(mport), scheme="https")  # fmt: skip
    srv.cert, srv.grpc_target = cert, f"127.0.0.1:{gport}"
    srv.metrics_url = f"http://127.0.0.1:{mport}"
    srv.trust = ssl.create_default_context(cafile=cert)  # the client's trust: this cert alone
    yield srv.wait_ready(verify=srv.trust)
    srv.stop()


def test_https_with_the_certificate_and_nothing_in_plain_text(tls_server, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    with httpx.Client(base_url=tls_server.url, verify=tls_server.trust, timeout=30) as c:
        r = c.post(PREDICT, content=jpg)
        assert r.status_code == 200 and r.json()["top_k"]
        assert c.get("/metrics").status_code == 404  # it has a port of its own
    with pytest.raises(httpx.ConnectError):  # a client that does not trust it
        httpx.get(tls_server.url + "/healthz", timeout=10)
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(plain + "/healthz", timeout=10)


def test_metrics_port_is_plain_http_without_the_main_doors(tls_server, data_dir):
    jpg = (data_dir / "images" / "small" / "dog.jpg").read_bytes()
    httpx.post(tls_server.url + PREDICT, content=jpg, verify=tls_server.trust, timeout=30)
    with httpx.Client(base_url=tls_server.metrics_url, timeout=30) as c:
        assert 'cvserve_requests_total{model="tiny-resnet",status="200"}' in c.get("/metrics").text
        assert c.get("/readyz").json()["ready"] is True
        assert c.get("/healthz").status_code == 200
        assert c.post(PREDICT, content=jpg).status_code == 404  # no model serving here


def test_grpc_over_tls(tls_server):
    with open(tls_server.cert, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    with grpc.secure_channel(tls_server.grpc_target, creds) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    with grpc.insecure_channel(tls_server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.ServerReady(pb.ServerReadyRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_bad_certificate_is_a_one_line_error(tmp_path, model_cache):
    import subprocess
    import sys

    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    r = subprocess.run(
        [sys.executable, "-m", "cvserve", "serve", "--model", "tiny-resnet", "--port",
         str(free_port()), "--cache-dir", str(model_cache), "--tls-cert", str(cert),
         "--tls-key", str(cert)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.startswith("error: TLS")], r.stderr
    assert "Traceback" not in r.stderr and "ready on" not in r.stderr


def test_bench_over_https_and_grpcs(tls_server, data_dir):
    from cvserve.bench import BenchConfig, run_bench

    img = str(data_dir / "images" / "small" / "dog.jpg")
    common = dict(model=MODEL, images=img, concurrency=[2], requests=4, warmup=0.0)
    for kw in (
        {"url": tls_server.url, "tls_ca": tls_server.cert},
        {"url": tls_server.url, "tls_insecure": True},
        {"url": tls_server.url, "tls_ca": tls_server.cert, "protocol": "v2-http"},
        {"url": f"grpcs://{tls_server.grpc_target}", "tls_ca": tls_server.cert,
         "protocol": "v2-grpc"},
    ):  # fmt: skip
        res = run_bench(BenchConfig(**common, **kw))
        assert res.points[0].ok == 4 and res.points[0].errors["total"] == 0, kw
    with pytest.raises(ServerUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        run_bench(BenchConfig(url=tls_server.url, **common))  # the system's roots: no trust
    with pytest.raises(ValueError, match="https://"):
        BenchConfig(url="http://127.0.0.1:1", tls_insecure=True, **common)
