"""Requests as OpenTelemetry traces (``cvserve.otel``), checked with the SDK's in-memory
exporter: a model request is a root span (the client's ``traceparent`` its parent) with
cvserve's stages as children, over HTTP and gRPC; a pipeline's broker items become spans
of the workers that ran them, in the same trace, in the server (in-process broker) and in
a ``cvserve worker`` process behind Redis (its own exporter, here the console one); with
tracing off, opentelemetry is never imported."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image
from served import start_worker, stop_processes

from cvserve import otel
from cvserve.config import ConfigError, PipelineConfig, ServerConfig, server_config_from_dict
from cvserve.serving.process import ServerThread, free_port
from cvserve.trace import STAGES

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the otel extra")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PARAMS = {"detector": "tiny-yolos", "classifier": "tiny-resnet", "objects": 3}
CLS = "1:20"  # ms, the simulated classifier


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    otel.configure(span_exporter=exporter)
    yield exporter
    otel.shutdown()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _finished(exporter: InMemorySpanExporter, n_roots: int, timeout: float = 10.0) -> list:
    """The spans once ``n_roots`` root (SERVER) spans have ended (a request's root ends
    just after its answer is sent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = exporter.get_finished_spans()
        if sum(s.kind == SpanKind.SERVER for s in done) >= n_roots:
            return list(done)
        time.sleep(0.02)
    raise AssertionError(f"no {n_roots} root spans: {[s.name for s in done]}")


def _check_request(done: list, name: str, status: int = 200):
    """The root span of the one request in ``done`` and its stage children, checked."""
    roots = [s for s in done if s.kind == SpanKind.SERVER]
    assert len(roots) == 1, [s.name for s in roots]
    root = roots[0]
    assert root.name == name
    assert f"{root.context.trace_id:032x}" == TRACE_ID  # the client's trace
    assert f"{root.parent.span_id:016x}" == PARENT_ID and root.parent.is_remote
    assert root.attributes["http.response.status_code"] == status
    assert root.attributes["cvserve.model"] == name
    stages = [s for s in done if s.parent is not None and s.parent.span_id == root.context.span_id
              and s.kind == SpanKind.INTERNAL]  # fmt: skip
    names = [s.name for s in stages]
    assert names and set(names) <= set(STAGES), names
    assert {"recv", "decode", "infer", "encode"} <= set(names), names
    for s in stages:  # laid end to end inside the root
        assert root.start_time <= s.start_time <= s.end_time <= root.end_time
        assert s.attributes["cvserve.stage"] == s.name
    return root, stages


def test_a_model_request_is_a_trace_of_its_stages(model_cache, spans):
    cfg = ServerConfig(port=free_port(), grpc_port=0, cache_dir=str(model_cache),
                       preprocess_threads=2, models=(_model(),))  # fmt: skip
    with ServerThread(cfg) as srv:
        r = httpx.post(f"{srv.url}/v1/models/tiny-resnet:predict", content=_jpeg(),
                       headers={"traceparent": TRACEPARENT}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        root, _ = _check_request(_finished(spans, 1), "tiny-resnet")
        assert root.attributes["cvserve.batch_size"] == 1
        assert root.attributes["cvserve.images"] == 1
        spans.clear()
        # gRPC: the traceparent metadata
        import grpc

        from cvserve.serving.v2.proto import inference_pb2 as pb
        from cvserve.serving.v2.proto import inference_pb2_grpc as rpc

        req = pb.ModelInferRequest(model_name="tiny-resnet")
        t = req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
        t.contents.bytes_contents.append(_jpeg())
        with grpc.insecure_channel(srv.grpc_target) as channel:
            rpc.GRPCInferenceServiceStub(channel).ModelInfer(
                req, metadata=(("traceparent", TRACEPARENT),), timeout=60
            )
        root, _ = _check_request(_finished(spans, 1), "tiny-resnet")
        spans.clear()
        # no traceparent (or a malformed one): a trace of its own
        r = httpx.post(f"{srv.url}/v1/models/tiny-resnet:predict", content=_jpeg(),
                       headers={"traceparent": "00-zz-bad-01"}, timeout=60)  # fmt: skip
        assert r.status_code == 200
        (root,) = [s for s in _finished(spans, 1) if s.kind == SpanKind.SERVER]
        assert root.parent is None and f"{root.context.trace_id:032x}" != TRACE_ID
        assert root.context.trace_id != 0
        spans.clear()
        # an error is traced with its status
        r = httpx.post(f"{srv.url}/v1/models/tiny-resnet:predict", content=b"not an image",
                       headers={"traceparent": TRACEPARENT}, timeout=60)  # fmt: skip
        assert r.status_code == 415
        (root,) = [s for s in _finished(spans, 1) if s.kind == SpanKind.SERVER]
        assert root.attributes["http.response.status_code"] == 415


def _model():
    from cvserve.config import ModelConfig

    return ModelConfig("tiny-resnet")


@pytest.fixture(scope="module")
def built(model_cache):
    from cvserve.models import store

    store.ensure_built("tiny-yolos", model_cache)
    return model_cache


def _dc(**kw) -> PipelineConfig:
    return PipelineConfig("dc", kind="detect-classify", block_ms=5, params=PARAMS,
                          runtime="simulated", sim_profile={"det": "1:5", "cls": CLS},
                          **kw)  # fmt: skip


def _check_workers(done: list, root, n: int, step: str = "dc.classify") -> None:
    workers = [s for s in done if s.kind == SpanKind.CONSUMER]
    assert len(workers) == n, [s.name for s in done]
    for w in workers:
        assert w.name == step and w.context.trace_id == root.context.trace_id
        assert w.parent.span_id == root.context.span_id  # the request's root, via the broker
        assert 1 <= w.attributes["cvserve.batch_size"] <= n
        kids = {
            s.name for s in done if s.parent is not None and s.parent.span_id == w.context.span_id
        }
        assert {"broker", "infer", "postprocess"} <= kids, kids


def test_a_pipeline_over_the_in_process_broker_traces_its_workers(built, spans):
    cfg = ServerConfig(port=free_port(), cache_dir=str(built), pipelines=(_dc(),))
    with ServerThread(cfg) as srv:
        r = httpx.post(f"{srv.url}/v1/pipelines/dc:predict", content=_jpeg(),
                       headers={"traceparent": TRACEPARENT}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        done = _finished(spans, 1)
    root, stages = _check_request(done, "dc")
    assert "broker" in {s.name for s in stages}
    assert root.attributes["cvserve.step.classify.batch_size"] >= 1
    # the pipeline's stages name their steps
    infer = next(s for s in stages if s.name == "infer")
    steps = {
        s.name for s in done if s.parent is not None and s.parent.span_id == infer.context.span_id
    }
    assert {"infer detect", "infer classify"} <= steps, steps
    _check_workers(done, root, PARAMS["objects"])


def _console_spans(text: str) -> list[dict]:
    """The spans a ``ConsoleSpanExporter`` printed (JSON objects) among other lines."""
    out, decoder, i = [], json.JSONDecoder(), 0
    while (i := text.find("{\n", i)) >= 0:
        obj, end = decoder.raw_decode(text, i)
        out.append(obj)
        i = end
    return out


def test_a_remote_worker_exports_its_spans_in_the_requests_trace(built, spans, redis_server):
    url = f"{redis_server.url}?prefix=o{free_port()}:"
    worker, _ = start_worker(
        ["--pipeline", "dc", "--kind", "detect-classify", "--stage", "classify",
         "--broker", url, "--cache-dir", str(built), "--runtime", "simulated",
         "--sim-profile", CLS, "--trace-exporter", "console",
         "--trace-service-name", "cls-worker",
         *[a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]]
    )  # fmt: skip
    try:
        cfg = ServerConfig(port=free_port(), cache_dir=str(built), broker=url,
                           pipelines=(_dc(stage_workers=0),))  # fmt: skip
        with ServerThread(cfg) as srv:
            r = httpx.post(f"{srv.url}/v1/pipelines/dc:predict", content=_jpeg(),
                           headers={"traceparent": TRACEPARENT}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
            done = _finished(spans, 1)
    finally:
        stop_processes(worker)
    root, _ = _check_request(done, "dc")
    assert not [s for s in done if s.kind == SpanKind.CONSUMER]  # none ran here
    printed = _console_spans(worker.stdout.read())
    mine = [s for s in printed if s["context"]["trace_id"] == f"0x{TRACE_ID}"]
    workers = [s for s in mine if s["kind"] == "SpanKind.CONSUMER"]
    assert len(workers) == PARAMS["objects"], printed
    for w in workers:
        assert w["name"] == "dc.classify"
        assert w["parent_id"] == f"0x{root.context.span_id:016x}"
        assert w["resource"]["attributes"]["service.name"] == "cls-worker"
        kids = {s["name"] for s in mine if s["parent_id"] == w["context"]["span_id"]}
        assert {"broker", "infer", "postprocess"} <= kids, kids


def test_trace_settings_are_checked_and_reach_the_config():
    cfg = server_config_from_dict(
        {
            "server": {"trace_exporter": "console", "trace_service_name": "edge-1"},
            "models": [{"name": "tiny-resnet"}],
        }
    )
    assert (cfg.trace_exporter, cfg.trace_service_name) == ("console", "edge-1")
    with pytest.raises(ConfigError, match="trace_exporter 'jaeger'; choose one of none, con"):
        ServerConfig(trace_exporter="jaeger")
    with pytest.raises(ConfigError, match="trace_service_name"):
        ServerConfig(trace_service_name="")


def test_tracing_off_never_imports_opentelemetry_and_on_without_it_is_one_line():
    off = (
        "import sys\n"
        "import cvserve.cli, cvserve.serving.server, cvserve.serving.pipelines.engine\n"
        "import cvserve.serving.pipelines.stage_process, cvserve.brokers.consumer\n"
        "from cvserve import otel\n"
        "from cvserve.cli import build_parser\n"
        "build_parser(); otel.configure('none')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", off], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    absent = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from cvserve.cli import main\n"
        "sys.exit(main(['serve', '--model', 'nothing-here', '--port', '0',"
        " '--trace-exporter', 'console']))\n"
    )
    out = subprocess.run([sys.executable, "-c", absent], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "pip install 'cvserve[otel]'" in out.stdout + out.stderr, out.stdout + out.stderr


def test_otlp_sends_the_spans_to_the_endpoint_the_standard_variables_name(monkeypatch):
    """``--trace-exporter otlp``: OTLP/HTTP protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otel extra")
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    got: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the stdlib's name)
            got.append((self.path, self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    collector = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_port}")
    from cvserve.trace import Trace

    try:
        otel.configure("otlp", "edge-7")
        trace = Trace()
        span = otel.request_span("tiny-resnet", TRACEPARENT, trace)
        trace.mark("recv")
        trace.mark("infer")
        span.finish(200, {"cvserve.model": "tiny-resnet"})
    finally:
        otel.shutdown()  # flushes the batch
        collector.shutdown()
    assert [path for path, _ in got] == ["/v1/traces"]
    sent = ExportTraceServiceRequest.FromString(got[0][1])
    (rs,) = sent.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "edge-7"
    names = sorted(s.name for ss in rs.scope_spans for s in ss.spans)
    assert names == ["infer", "recv", "tiny-resnet"]
    assert all(s.trace_id.hex() == TRACE_ID for ss in rs.scope_spans for s in ss.spans)


def test_a_worker_span_of_an_item_that_failed_is_an_error_and_untraced_items_have_none(spans):
    """At the stage loop itself: an item with a traceparent gets its span (an error when
    it failed), an item without one (tracing off where it was sent) gets none."""
    import asyncio

    import numpy as np
    from opentelemetry.trace import StatusCode

    from cvserve.brokers import InProcessBroker, Message, ResultRouter, StageConsumer

    async def stage(batch: list[Message]) -> list[Message]:
        x = np.stack([m.arrays["x"] for m in batch])  # KeyError on the item without x
        return [m.reply(arrays={"y": r * 2}, headers={"infer_s": 0.001})
                for m, r in zip(batch, x, strict=True)]  # fmt: skip

    async def main():
        async with InProcessBroker() as b, ResultRouter(b) as router:
            worker = StageConsumer(b, "dc.classify", "g", stage, batch=3, block_ms=20)
            worker.span_stages = {"infer_s": "infer"}
            futs = []
            for k, (arrays, traced) in enumerate(
                [({"x": np.ones(2)}, True), ({}, True), ({"x": np.ones(2)}, False)]
            ):
                futs.append(router.expect(f"r{k}", 1))
                headers = {otel.TRACEPARENT: TRACEPARENT} if traced else {}
                await b.publish("dc.classify", Message(f"r{k}", arrays=arrays, headers=headers,
                                                       reply_to=router.topic))  # fmt: skip
            serving = asyncio.create_task(worker.run())
            await asyncio.wait_for(asyncio.gather(*futs), 10)
            worker.stop()
            await serving

    asyncio.run(main())
    done = spans.get_finished_spans()
    workers = [s for s in done if s.kind == SpanKind.CONSUMER]
    assert len(workers) == 2  # the untraced item has none
    assert all(f"{w.parent.span_id:016x}" == PARENT_ID for w in workers)
    failed = [w for w in workers if w.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1 and "KeyError" in failed[0].status.description
