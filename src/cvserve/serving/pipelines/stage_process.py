"""The process behind ``cvserve worker``: it serves one broker step of a pipeline until
told to stop (the consume loop itself is :mod:`cvserve.brokers.consumer`). Two such
processes on one step share its load (one consumer group); one that dies leaves its items
pending, and another reclaims them."""

from __future__ import annotations

import asyncio
import logging
import signal

from cvserve import otel
from cvserve.brokers import BrokerUnavailable, broker_from_url, redact_url
from cvserve.config import PipelineConfig
from cvserve.serving.pipelines.base import StageOptions, describe_runtime
from cvserve.serving.pipelines.engine import cpu_budget, load_graph, runtime_options
from cvserve.serving.pipelines.workers import StepWorkers
from cvserve.trace import Say

log = logging.getLogger(__name__)


def run_stage_process(
    config: PipelineConfig,
    stage: str,
    broker_url: str,
    say: Say = log.info,
    cache_dir: str | None = None,
    *,
    trace_exporter: str = "none",
    trace_service_name: str = "cvserve",
) -> int:
    """Serve ``stage`` until SIGTERM/SIGINT. ``trace_exporter``: this process's spans of
    the items it serves, to that exporter (``cvserve.otel``), the server's setting."""
    otel.configure(trace_exporter, trace_service_name)  # before loading: a clear error
    graph = load_graph(config, cache_dir)
    served = [s.name for s in graph.broker_steps]
    if stage not in served:
        raise ValueError(
            f"pipeline {config.name!r} runs step(s) {', '.join(served) or 'none'} over the "
            f"broker; workers serve those, not {stage!r}"
        )
    if broker_url.startswith("inprocess:"):
        raise ValueError("an in-process broker cannot reach another process: use redis://")
    step = graph.step(stage)

    async def main() -> None:
        broker = broker_from_url(broker_url)
        options = StageOptions(
            intra_op_threads=config.intra_op_threads,
            cache_dir=cache_dir,
            params=dict(config.params),
            budget=cpu_budget(config),
            **runtime_options(config),
        )
        try:
            await broker.ping()  # refused credentials: one clear error now, no retry loop
        except BrokerUnavailable as e:
            say(f"worker: {e}; serving once it answers")  # down for now: keep retrying
        except BaseException:
            await broker.close()
            raise
        runner = StepWorkers(config, step, broker, options)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await runner.start()
        say(
            f"worker: {len(runner.workers)} x {stage} of {config.name} on {runner.topic} "
            f"via {redact_url(broker_url)}{_simulated_note(runner.options)}"
        )
        await stop.wait()
        say("worker: finishing the batch in hand")
        await runner.stop()
        counts = runner.counts()
        say(f"worker: {counts['processed']} items served, {counts['expired']} dropped past "
            "their deadline")  # fmt: skip
        await broker.close()

    try:
        asyncio.run(main())
    finally:
        otel.shutdown()  # the spans still queued go out
    return 0


def _simulated_note(options: StageOptions) -> str:
    if not options.simulated:
        return ""
    profiles = describe_runtime(options)["profiles"]
    said = ", ".join(f"{dnn} {p['source']}" for dnn, p in profiles.items())
    return f" [SIMULATED accelerator, {options.sim_devices} device(s) per DNN: {said}]"
