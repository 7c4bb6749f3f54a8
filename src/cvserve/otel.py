"""Requests as OpenTelemetry traces (the ``otel`` extra), built from cvserve's own stages.

Off by default, and then ``opentelemetry`` is never imported. :func:`configure` turns it
on (``--trace-exporter console|otlp``, the standard ``OTEL_EXPORTER_OTLP_*`` variables
for where OTLP goes). Each request then becomes one trace:

- a root span named after the model or pipeline (kind SERVER), a child of the client's
  W3C ``traceparent`` (HTTP header or gRPC metadata) when it sends one, with the status,
  the model and the images as attributes;
- one child span per stage of its :class:`~cvserve.trace.Trace` (``recv``, ``queue``,
  ``decode``, ... ``encode``), laid end to end from the durations the trace keeps (the
  stages of a request are contiguous); a pipeline's stage has one child per step that
  spent time in it;
- each item a pipeline sends over the broker carries the root span's ``traceparent``
  (header :data:`TRACEPARENT`), and the worker that serves it, in this process or a
  ``cvserve worker`` process with its own exporter, exports a span of the step
  (``broker``, ``infer``, ``postprocess`` as children) in the same trace.

Spans are built after the fact with the real wall-clock times, so tracing costs nothing
while a request runs.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Mapping
from typing import Any

from cvserve.trace import Trace

__all__ = [
    "EXPORTERS",
    "TRACEPARENT",
    "RequestSpan",
    "configure",
    "current_traceparent",
    "enabled",
    "note",
    "request_span",
    "shutdown",
    "worker_spans",
]

#: HTTP header, gRPC metadata key and broker message header of the W3C trace context.
TRACEPARENT = "traceparent"
#: ``--trace-exporter`` values: off, spans printed to stdout, OTLP over HTTP.
EXPORTERS = ("none", "console", "otlp")
_PARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

_tracer: Any = None
_provider: Any = None
_current: contextvars.ContextVar[RequestSpan | None] = contextvars.ContextVar(
    "cvserve_span", default=None
)


def enabled() -> bool:
    return _tracer is not None


def configure(exporter: str = "none", service_name: str = "cvserve", *, span_exporter=None):
    """Export traces: ``exporter`` one of :data:`EXPORTERS`, or ``span_exporter`` (an
    SDK ``SpanExporter``, e.g. the in-memory one of tests), exported as each span ends.
    ``none`` and no ``span_exporter``: off. ImportError (naming the ``otel`` extra) when
    the SDK is absent. Returns the tracer provider (None when off)."""
    global _tracer, _provider
    shutdown()
    if exporter not in EXPORTERS:
        raise ValueError(f"trace exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "none" and span_exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    elif exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:  # otlp: where to, from the standard OTEL_EXPORTER_OTLP_* variables
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, _tracer = provider, provider.get_tracer("cvserve")
    return provider


def shutdown() -> None:
    """Flush and stop the exporter (spans still queued are sent); tracing is off after."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def _parent(traceparent: str | bytes | None):
    """The OpenTelemetry context of a ``traceparent`` value (None: absent or malformed)."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("latin-1")
    m = _PARENT.fullmatch((traceparent or "").strip().lower())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
        return None
    from opentelemetry import trace as api

    ctx = api.SpanContext(
        int(m.group(1), 16), int(m.group(2), 16), is_remote=True,
        trace_flags=api.TraceFlags(int(m.group(3), 16) & 1),
    )  # fmt: skip
    return api.set_span_in_context(api.NonRecordingSpan(ctx))


def _traceparent(span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def _wall_ns(perf: float, now_perf: float, now_ns: int) -> int:
    """``time.perf_counter`` value ``perf`` as wall-clock nanoseconds."""
    return now_ns - int((now_perf - perf) * 1e9)


class RequestSpan:
    """The root span of one request in hand (see :func:`request_span`)."""

    def __init__(self, name: str, traceparent: str | bytes | None, trace: Trace) -> None:
        from opentelemetry.trace import SpanKind

        self.trace = trace
        self.attributes: dict[str, Any] = {}
        self.start_ns = _wall_ns(trace.start, time.perf_counter(), time.time_ns())
        self.span = _tracer.start_span(
            name, context=_parent(traceparent), kind=SpanKind.SERVER, start_time=self.start_ns
        )
        self.traceparent = _traceparent(self.span)
        self._token = _current.set(self)

    def finish(self, status: int, attributes: Mapping[str, Any] = {}) -> None:
        """End the root span and its stage spans, now; ``status`` the request's."""
        from opentelemetry.trace import Status, StatusCode

        _current.reset(self._token)
        now_ns = time.time_ns()
        trace, span = self.trace, self.span
        span.set_attributes({"http.response.status_code": status, **attributes,
                             **self.attributes})  # fmt: skip
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"status {status}"))
        parent = _tracer_context(span)
        t = self.start_ns  # the stages are contiguous from the request's start
        for stage, seconds in trace.stages.items():
            end = t + int(seconds * 1e9)
            child = _tracer.start_span(stage, context=parent, start_time=t)
            child.set_attribute("cvserve.stage", stage)
            steps = trace.steps.get(stage)
            if steps:
                inner, at = _tracer_context(child), t
                for step, s in steps.items():
                    g = _tracer.start_span(f"{stage} {step}", context=inner, start_time=at)
                    g.set_attributes({"cvserve.stage": stage, "cvserve.step": step})
                    at += int(s * 1e9)
                    g.end(end_time=at)
            child.end(end_time=end)
            t = end
        span.end(end_time=max(now_ns, t))


def _tracer_context(span):
    from opentelemetry import trace as api

    return api.set_span_in_context(span)


def request_span(name: str, traceparent: str | bytes | None, trace: Trace) -> RequestSpan | None:
    """Begin the root span of a request whose stages ``trace`` times (None: tracing off);
    until :meth:`RequestSpan.finish`, :func:`current_traceparent` is its context."""
    return None if _tracer is None else RequestSpan(name, traceparent, trace)


def current_traceparent() -> str | None:
    """The ``traceparent`` of the request in hand (what its broker items carry), or None."""
    span = _current.get()
    return None if span is None else span.traceparent


def note(key: str, value: Any) -> None:
    """Set an attribute on the request in hand's root span (nothing when tracing is off)."""
    span = _current.get()
    if span is not None:
        span.attributes[key] = value


def worker_spans(
    step: str,
    items: list[tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    published: list[float | None],
    consumed: list[float],
    done: float,
    stage_headers: Mapping[str, str],
    error_header: str = "error",
    attributes: Mapping[str, Any] = {},
) -> None:
    """One span per broker item that carries a :data:`TRACEPARENT` (kind CONSUMER, a child
    of its request's root span): from its publication to ``done`` (wall clock,
    ``time.time()``), with ``broker`` (publish to consume) and each stage its result's
    headers time (``stage_headers``: header -> stage, seconds) as children, the stages
    laid back from ``done``; a result with ``error_header`` is an error span. ``items``:
    (work headers, result headers) pairs."""
    if _tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode

    end_ns = int(done * 1e9)
    for (work, result), pub, got in zip(items, published, consumed, strict=True):
        parent = _parent(work.get(TRACEPARENT))  # type: ignore[arg-type]
        if parent is None:
            continue
        got_ns = int(got * 1e9)
        start_ns = int(pub * 1e9) if pub is not None else got_ns
        span = _tracer.start_span(step, context=parent, kind=SpanKind.CONSUMER,
                                  start_time=start_ns)  # fmt: skip
        span.set_attributes({"cvserve.step": step, **attributes})
        if error_header in result:
            span.set_status(Status(StatusCode.ERROR, str(result[error_header])))
        inner = _tracer_context(span)
        b = _tracer.start_span("broker", context=inner, start_time=start_ns)
        b.set_attribute("cvserve.stage", "broker")
        b.end(end_time=max(start_ns, got_ns))
        timed = [(stage, float(result[h])) for h, stage in stage_headers.items() if h in result]
        t = end_ns - int(sum(s for _, s in timed) * 1e9)
        for stage, seconds in timed:
            c = _tracer.start_span(stage, context=inner, start_time=t)
            c.set_attribute("cvserve.stage", stage)
            t += int(seconds * 1e9)
            c.end(end_time=t)
        span.end(end_time=max(end_ns, start_ns))
