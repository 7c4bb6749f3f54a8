"""Prometheus metrics of one server, named after the DESIGN.md stages.

One process (the default): a registry per app, rendered as it is. Several processes
(``serve --workers N``): each counts into prometheus-client's multiprocess directory (its
parent sets ``PROMETHEUS_MULTIPROC_DIR`` before the process starts), and rendering merges
every process's files, so any process's ``/metrics`` counts every process's requests:
counters and histograms summed, gauges summed over the live processes (``livesum``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render_multiprocess(path: str) -> bytes:
    """Every process's metrics in the multiprocess directory ``path``, merged."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


class Metrics:
    """Counters and histograms in a registry of their own (one per app, not global);
    ``multiprocess_dir``: one process of several (see the module docstring)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        if multiprocess_dir is not None and not getattr(_values.ValueClass, "_multiprocess", 0):
            raise RuntimeError(
                "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR set before "
                "prometheus_client is imported (the parent of --workers sets it)"
            )
        #: The multiprocess directory rendered from, or None (this process only).
        self.multiprocess_dir = multiprocess_dir
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "cvserve_requests", "Requests answered, by model and HTTP status", ["model", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "cvserve_request_duration_seconds", "Server time per request", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage = Histogram(
            "cvserve_stage_duration_seconds", "Time per request in each stage", ["model", "stage"],
            buckets=_STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "cvserve_batch_size", "Images per inference batch", ["model"],
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        # several processes: the sum over the live ones (one process: ignored)
        self.queue_depth = Gauge(
            "cvserve_queue_depth", "Requests admitted and not yet answered", ["model"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.busy_instances = Gauge(
            "cvserve_busy_instances", "Model instances running a batch", ["model"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        # admission (serving.core.Admission): what the server expects, and what it refuses
        self.service_rate = Gauge(
            "cvserve_service_rate", "Requests a model finishes per second while busy (0: "
            "not measured yet)", ["model"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.expected_wait = Gauge(
            "cvserve_expected_wait_seconds", "A new request's expected time to its answer "
            "(0: no service rate yet)", ["model"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.wait_limit = Gauge(
            "cvserve_wait_limit_seconds", "The longest expected wait admitted (0: no limit by "
            "time now)", ["model"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        # pipelines (serving.pipelines.engine): each step's work, named
        self.step_seconds = Histogram(
            "cvserve_pipeline_step_seconds", "Time per call of a pipeline step, by part (infer, "
            "postprocess; broker: the rest of a broker step's round trip)",
            ["pipeline", "step", "part"], buckets=_STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_items = Counter(
            "cvserve_pipeline_step_items", "Items (images or crops) a pipeline step ran on",
            ["pipeline", "step"], registry=r,
        )  # fmt: skip
        self.step_batch = Histogram(
            "cvserve_pipeline_step_batch_size", "Items per call of a pipeline step (a broker "
            "step: the batch its worker ran)", ["pipeline", "step"], buckets=_BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.step_expired = Counter(
            "cvserve_pipeline_step_expired_items", "Items a worker here dropped unrun: their "
            "request's deadline had passed, or would before they finished",
            ["pipeline", "step"], registry=r,
        )  # fmt: skip
        self.model_memory = Gauge(
            "cvserve_model_memory_bytes", "Memory a loaded model version holds: its weights "
            "(per instance), the runtime's growth when it opened (an estimate), its batch "
            "buffers", ["model", "version", "kind"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.edge_refusals = Counter(
            "cvserve_edge_refusals", "Requests the edge answered before any model: no or a "
            "wrong API key (401, 403), models still loading (503)", ["status", "kind"],
            registry=r,
        )  # fmt: skip

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    def observe_request(self, model: str, status: int, stages: dict[str, float]) -> None:
        self.requests.labels(model, str(status)).inc()
        self.latency.labels(model).observe(sum(stages.values()))
        for name, seconds in stages.items():
            self.stage.labels(model, name).observe(seconds)

    def batch_observer(self, model: str):
        """The batcher's ``on_batch`` hook for ``model``: records each batch's size."""
        hist = self.batch_size.labels(model)
        return lambda info: hist.observe(info.size)

    def step_observer(self, pipeline: str):
        """``on_step(step, items, batch, parts)`` for a pipeline: ``parts`` maps infer,
        postprocess and broker to seconds of one call."""

        def observe(step: str, items: int, batch: int, parts: dict[str, float]) -> None:
            self.step_items.labels(pipeline, step).inc(items)
            self.step_batch.labels(pipeline, step).observe(batch)
            for part, seconds in parts.items():
                self.step_seconds.labels(pipeline, step, part).observe(max(0.0, seconds))

        return observe

    def expired_observer(self, pipeline: str):
        return lambda step, n: self.step_expired.labels(pipeline, step).inc(n)

    def render(self) -> bytes:
        if self.multiprocess_dir is not None:
            return render_multiprocess(self.multiprocess_dir)
        return generate_latest(self.registry)
