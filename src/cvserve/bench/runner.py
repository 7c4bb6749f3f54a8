"""``run_bench``: probe the server, run a sweep of load points, summarize each point.

The call is synchronous and owns its event loop (uvloop when installed), so it can be
called from a plain thread while the server runs in another thread or process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from time import monotonic, perf_counter
from typing import Any

import numpy as np

import cvserve.bench._http as _http
import cvserve.bench.v2 as v2
from cvserve.bench.errors import BenchError, BenchInterrupted, ServerUnreachable, TargetNotServed
from cvserve.bench.inputs import BenchImage, load_images
from cvserve.bench.loadgen import run_point
from cvserve.bench.point import LoadSettings, OnProgress, PointPlan, PointRecords
from cvserve.bench.results import BenchResult, PointSummary
from cvserve.bench.stats import breakdown, latency_summary
from cvserve.machine import machine_info
from cvserve.trace import STAGES, parse_server_timing, server_timing_simulated

log = logging.getLogger(__name__)

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchInterrupted",
    "OnProgress",
    "TargetNotServed",
    "ServerUnreachable",
    "run_bench",
    "summarize_point",
]


@dataclass(frozen=True)
class BenchConfig(LoadSettings):
    """What to measure. Points: one per ``concurrency`` (closed loop), then one per
    ``rates`` entry (open loop, Poisson arrivals per second); neither means ``[1]``.

    The :class:`~cvserve.bench.point.LoadSettings` (keyword-only) apply to every point:
    each point warms up for ``warmup`` s, then measures ``requests`` requests if set, else
    ``duration`` s if set, else ``window``-second windows until three agree within
    ``tolerance`` on throughput and p50 latency, or ``max_duration`` s pass (unstable).
    ``images`` is a list of :class:`BenchImage` or a path (file or directory) or paths.

    ``protocol``: ``"v1"`` (cvserve's predict route), ``"v2-http"`` or ``"v2-grpc"``
    (KServe v2, any v2 server: see :mod:`cvserve.bench.v2`). For v2: ``input_name``
    picks the input (default from the model metadata), ``input_tensor`` sends the model's
    own input tensor preprocessed here instead of the encoded image, ``json_tensors``
    (v2-http) sends it as JSON instead of binary. ``url`` is ``grpc://host:port`` for
    v2-grpc, or an HTTP URL (for cvserve's ``/v1`` model description) with ``grpc_target``.

    Security: ``api_key`` goes out as ``Authorization: Bearer KEY`` (gRPC: metadata);
    ``https://`` and ``grpcs://`` use TLS, trusting ``tls_ca`` (a PEM file: a self-signed
    server's certificate) or else the system's roots; ``tls_insecure`` (HTTPS only) checks
    no certificate.
    """

    url: str
    model: str
    images: Sequence[BenchImage] | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    concurrency: Sequence[int] | None = None
    rates: Sequence[float] | None = None
    ready_timeout: float = 0.0
    label: str | None = None
    #: What ``model`` names: a served ``"model"`` or a multi-DNN ``"pipeline"``.
    kind: str = "model"
    protocol: str = "v1"
    input_name: str | None = None
    input_tensor: bool = False
    json_tensors: bool = False
    grpc_target: str | None = None
    api_key: str | None = None
    tls_ca: str | None = None
    tls_insecure: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("model", "pipeline"):
            raise ValueError(f"kind must be 'model' or 'pipeline', got {self.kind!r}")
        if self.protocol not in v2.PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(v2.PROTOCOLS)}")

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"invalid bench config: {what}")

        check(all(c >= 1 for c in self.concurrency or ()), "concurrency must be >= 1")
        check(all(r > 0 for r in self.rates or ()), "rates must be > 0")
        check(self.duration is None or self.duration > 0, "duration must be > 0")
        check(self.requests is None or self.requests >= 1, "requests must be >= 1")
        check(not (self.duration is not None and self.requests is not None),
              "give duration or requests, not both")  # fmt: skip
        check(self.warmup >= 0, "warmup must be >= 0")
        check(self.timeout > 0, "timeout must be > 0")
        check(self.window > 0, "window must be > 0")
        check(self.tolerance > 0, "tolerance must be > 0")
        check(self.max_duration > 0, "max_duration must be > 0")
        check(self.max_in_flight >= 1, "max_in_flight must be >= 1")
        check(self.ready_timeout >= 0, "ready_timeout must be >= 0")
        v1 = self.protocol == "v1"
        check(not (v1 and (self.input_tensor or self.input_name or self.grpc_target)),
              "input_tensor, input_name and grpc_target are for the v2 protocols")  # fmt: skip
        check(not self.json_tensors or (self.protocol == "v2-http" and self.input_tensor),
              "json_tensors needs protocol v2-http and input_tensor (images are BYTES)")  # fmt: skip
        check(v1 or self.kind == "model" or not self.input_tensor,
              "a pipeline takes images, not input tensors")  # fmt: skip
        check(self.grpc_target is None or self.protocol == "v2-grpc",
              "grpc_target is for protocol v2-grpc")  # fmt: skip
        if self.protocol == "v2-grpc":
            from cvserve.bench._grpc import parse_target

            check(self.grpc_target is not None or self.url.startswith(("grpc://", "grpcs://")),
                  "v2-grpc needs url grpc://host:port or a grpc_target")  # fmt: skip
            parse_target(self.grpc_address)  # type: ignore[arg-type]  # ValueError if bad
            check(not self.tls_insecure, "tls_insecure is for https:// (gRPC: give tls_ca)")
        if self.url.startswith(("grpc://", "grpcs://")):
            check(self.protocol == "v2-grpc", "a grpc:// url needs protocol v2-grpc")
        else:
            self.http_target()  # raises ValueError on a bad URL

    def http_target(self) -> _http.Target:
        """The HTTP target of ``url``, with the API key and TLS settings."""
        return _http.Target.from_url(
            self.url, api_key=self.api_key, ca_file=self.tls_ca, insecure=self.tls_insecure
        )

    def grpc_transport(self) -> Any:
        """The gRPC target (protocol v2-grpc), with the API key and TLS settings."""
        from cvserve.bench._grpc import GrpcTarget  # grpcio only when it is used

        where = self.grpc_target or self.url
        return GrpcTarget(
            where, tls=where.startswith("grpcs://"), ca_file=self.tls_ca, api_key=self.api_key
        )

    @property
    def grpc_address(self) -> str | None:
        """``host:port`` of the gRPC server (protocol v2-grpc), else None."""
        if self.protocol != "v2-grpc":
            return None
        target = self.grpc_target or self.url
        return target.removeprefix("grpcs://").removeprefix("grpc://").rstrip("/")

    def plans(self, max_in_flight: int) -> list[PointPlan]:
        common = vars(self.load_settings(max_in_flight=max_in_flight))
        concurrency = list(self.concurrency or ())
        rates = list(self.rates or ())
        if not concurrency and not rates:
            concurrency = [1]
        plans = [PointPlan(i, concurrency=c, **common) for i, c in enumerate(concurrency)]
        n = len(plans)
        plans += [PointPlan(n + i, rate=float(r), **common) for i, r in enumerate(rates)]
        return plans


def _fd_limit(wanted: int) -> int:
    """``wanted`` in-flight requests, or fewer if the open-file limit cannot hold them."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - 64))


def _config_dict(config: BenchConfig, images: list[BenchImage], max_in_flight: int) -> dict:
    doc: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "images":
            value = [
                {"name": im.name, "bytes": len(im.data), "content_type": im.content_type}
                for im in images
            ]
        elif isinstance(value, tuple | list):
            value = list(value)
        elif f.name == "api_key" and value:
            value = "(set)"  # never written to a result
        doc[f.name] = value
    doc["max_in_flight_effective"] = max_in_flight
    return doc


# --- summaries -------------------------------------------------------------------------
def summarize_point(
    rec: PointRecords, run_t0: float, images_per_request: int = 1
) -> tuple[PointSummary, dict[str, np.ndarray]]:
    """One point's summary over its measured interval, and its per-request rows."""
    n = len(rec.t0)
    lat = rec.t1 - rec.t0
    stage_cols: dict[str, np.ndarray] = {}
    malformed = np.zeros(n, dtype=np.int32)
    has_timing = np.zeros(n, dtype=bool)
    simulated = np.zeros(n, dtype=bool)
    for i, raw in enumerate(rec.timing):
        if raw is None:
            continue
        text = raw.decode("latin-1")
        stages, bad = parse_server_timing(text)
        simulated[i] = server_timing_simulated(text)
        has_timing[i] = True
        malformed[i] = bad
        for name, seconds in stages.items():
            col = stage_cols.get(name)
            if col is None:
                col = stage_cols[name] = np.zeros(n, dtype=np.float64)
            col[i] = seconds
    stage_cols = {k: stage_cols[k] for k in STAGES if k in stage_cols and k != "network"}

    measured = rec.measured
    is_ok = (rec.status >= 200) & (rec.status < 300)
    ok = measured & is_ok
    bad = measured & ~is_ok
    seconds = max(rec.measure_end - rec.measure_start, 0.0)
    n_ok = int(ok.sum())

    statuses, counts = np.unique(rec.status[bad & (rec.status > 0)], return_counts=True)
    kinds, kind_counts = np.unique(rec.error[bad & (rec.error > 0)], return_counts=True)
    batches = rec.batch[ok & (rec.batch >= 0)]
    timed = ok & has_timing
    ms, pct = breakdown(lat[timed], {k: v[timed] for k, v in stage_cols.items()})

    plan = rec.plan
    warnings = list(rec.warnings)
    n_sim = int((ok & simulated).sum())
    if n_sim:
        warnings.append(
            f"simulated accelerator: {n_sim} of {n_ok} responses ran on a simulated device "
            "(sim=1 in Server-Timing); their infer time is a latency profile's, not a real DNN's"
        )
    summary = PointSummary(
        index=plan.index,
        mode=plan.mode,
        concurrency=plan.concurrency,
        rate=plan.rate,
        stop_reason=rec.stop_reason,
        stable=rec.stable,
        started_s=rec.t_start - run_t0,
        measure_s=seconds,
        requests=int(measured.sum()),
        ok=n_ok,
        throughput_rps=n_ok / seconds if seconds > 0 else 0.0,
        images_per_s=n_ok * images_per_request / seconds if seconds > 0 else 0.0,
        request_rate_rps=int(measured.sum()) / seconds if seconds > 0 else 0.0,
        offered_rps=(rec.offered / seconds if seconds > 0 else 0.0)
        if plan.mode == "open"
        else None,
        dropped=rec.dropped,
        unfinished=rec.unfinished,
        send_lag_ms=None
        if rec.send_lag is None
        else {"mean": rec.send_lag[0] * 1000.0, "max": rec.send_lag[1] * 1000.0},
        latency_ms=latency_summary(lat[ok]),
        errors={
            "total": int(bad.sum()),
            "by_status": {str(s): int(c) for s, c in zip(statuses, counts, strict=True)},
            "by_kind": {
                _http.ERROR_KINDS[k - 1]: int(c) for k, c in zip(kinds, kind_counts, strict=True)
            },
        },
        mean_batch_size=float(batches.mean()) if batches.size else None,
        mean_response_bytes=float(rec.nbytes[ok].mean()) if n_ok else None,
        server_timing_malformed=int(malformed[measured].sum()),
        server_timing_missing=int((ok & ~has_timing).sum()),
        breakdown_ms=ms,
        breakdown_pct=pct,
        windows=[vars(w).copy() for w in rec.windows],
        warnings=warnings,
        retry_wait_s=rec.retry_wait_s,
        simulated_responses=n_sim,
    )

    starts = np.array([rec.t_start + w.start for w in rec.windows], dtype=np.float64)
    window = np.searchsorted(starts, rec.t1, side="right").astype(np.int32) - 1
    if rec.windows:
        last = rec.windows[-1]
        window[rec.t1 >= rec.t_start + last.start + last.seconds] = len(rec.windows)
    server = np.zeros(n, dtype=np.float64)
    for col in stage_cols.values():
        server += col
    rows = {
        "point": np.full(n, plan.index, dtype=np.int32),
        "window": window,
        "measured": measured,
        "image": rec.image,
        "start": rec.t0 - run_t0,
        "latency": lat,
        "status": rec.status,
        "error": rec.error,
        "batch_size": rec.batch,
        "response_bytes": rec.nbytes,
        "st_malformed": malformed,
        "has_timing": has_timing,
        "simulated": simulated,
        **{f"stage_{k}": v for k, v in stage_cols.items()},
        "stage_network": np.where(has_timing, lat - server, np.nan),
    }
    return summary, rows


def _concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-point rows; a stage one point lacks is 0 there (network: NaN)."""
    if not parts:
        return {}
    names: list[str] = []
    for part in parts:
        names += [k for k in part if k not in names]
    out = {}
    for name in names:
        cols = []
        for part in parts:
            n = len(part["point"])
            fill = np.nan if name == "stage_network" else 0.0
            cols.append(part[name] if name in part else np.full(n, fill))
        out[name] = np.concatenate(cols)
    return out


# --- the run ---------------------------------------------------------------------------
async def _probe(config: BenchConfig, target: _http.Target, images: list[BenchImage]) -> dict:
    """Fail fast, before the sweep: the server must be ready and must know the model."""
    timeout = min(config.timeout, 5.0)
    deadline = monotonic() + config.ready_timeout
    ready = target.request("GET", "/readyz")
    while True:
        try:
            status, body = await _http.fetch(target, ready, timeout)
            problem = f"GET /readyz answered {status}: {body[:200].decode('utf-8', 'replace')}"
            if status == 200:
                break
        except (OSError, ConnectionError) as e:
            problem = f"cannot reach {config.url}: {e or type(e).__name__}"
        if monotonic() >= deadline:
            raise ServerUnreachable(f"server not ready: {problem}")
        await asyncio.sleep(0.1)

    models: Any = None
    try:
        status, body = await _http.fetch(target, target.request("GET", "/v1/models"), timeout)
        if status == 200:
            models = json.loads(body)
    except (OSError, ConnectionError, ValueError):
        pass

    first = images[0]
    try:
        status, body = await _http.fetch(
            target,
            target.predict_request(config.model, first.data, first.content_type, config.kind),
            config.timeout,
        )
    except TimeoutError:  # a slow server is what a bench is for: measure it
        log.warning("the first predict request took over %ss", config.timeout)
        return {"url": config.url, "models": models}
    except (OSError, ConnectionError) as e:
        raise ServerUnreachable(
            f"first predict request to {config.url} failed: {e or type(e).__name__}"
        ) from e
    if status == 404:
        text = body[:300].decode("utf-8", "replace")
        raise TargetNotServed(f"{config.kind} {config.model!r} not served at {config.url}: {text}")
    return {"url": config.url, "models": models}


@dataclass
class _Sweep:
    """What a sweep has measured so far: kept when it is interrupted, and the points a
    resumed sweep skips."""

    server: dict = field(default_factory=dict)
    points: list[PointSummary] = field(default_factory=list)
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)

    def resumed_from(self, config: BenchConfig, prior: BenchResult, plans: list[PointPlan]) -> None:
        """Take ``prior``'s points when they are points of this sweep, else refuse."""
        if prior.config.get("model") != config.model or prior.config.get("url") != config.url:
            raise BenchError(
                f"--resume: the result holds a run of {prior.config.get('model')!r} at "
                f"{prior.config.get('url')}, not of {config.model!r} at {config.url}"
            )
        by_index = {p.index: p for p in plans}
        for point in prior.points:
            plan = by_index.get(point.index)
            if plan is None or (plan.concurrency, plan.rate) != (point.concurrency, point.rate):
                raise BenchError(
                    f"--resume: point {point.load_label} of the result is not a point of this "
                    "sweep (pass the same --concurrency/--rate)"
                )
        self.points = list(prior.points)
        self.rows = [prior.rows] if prior.rows else []

    def done(self) -> set[int]:
        return {p.index for p in self.points}


async def _sweep(
    config: BenchConfig,
    images: list[BenchImage],
    progress: OnProgress | None,
    max_in_flight: int,
    sweep: _Sweep,
    on_point: Callable[[], None] | None,
) -> None:
    target: _http.Transport
    if config.protocol == "v1":
        target = config.http_target()
        server = await _probe(config, target, images)
        requests: list[Any] = [
            target.predict_request(config.model, im.data, im.content_type, config.kind)
            for im in images
        ]
    else:
        setup = await v2.prepare(
            protocol=config.protocol,
            http=None if config.url.startswith(("grpc://", "grpcs://")) else config.http_target(),
            gtarget=config.grpc_transport() if config.protocol == "v2-grpc" else None,
            url=config.url,
            model=config.model,
            images=images,
            input_name=config.input_name,
            input_tensor=config.input_tensor,
            json_tensors=config.json_tensors,
            timeout=config.timeout,
            probe_timeout=min(config.timeout, 5.0),
            ready_timeout=config.ready_timeout,
        )
        target, server, requests = setup.target, setup.server, setup.requests
    sweep.server = server
    try:
        await _run_points(config, target, requests, sweep, progress, max_in_flight, on_point)
    finally:
        close = getattr(target, "close", None)  # a gRPC channel
        if close is not None:
            await close()


async def _run_points(
    config: BenchConfig,
    target: _http.Transport,
    requests: list[Any],
    sweep: _Sweep,
    progress: OnProgress | None,
    max_in_flight: int,
    on_point: Callable[[], None] | None,
) -> None:
    plans = config.plans(max_in_flight)
    done = sweep.done()

    def report(event: dict[str, Any]) -> None:
        event["points"] = len(plans)
        progress(event)  # type: ignore[misc]

    run_t0 = perf_counter()
    for plan in plans:
        if plan.index in done:
            continue  # measured by the run this one resumes
        rec = await run_point(plan, target, requests, report if progress else None)
        summary, point_rows = summarize_point(rec, run_t0)
        for warning in summary.warnings:
            log.warning("point %s: %s", summary.load_label, warning)
        sweep.points.append(summary)
        sweep.rows.append(point_rows)
        if on_point is not None:
            on_point()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run_bench(
    config: BenchConfig,
    progress: OnProgress | None = None,
    command: Sequence[str] | None = None,
    *,
    resume: BenchResult | None = None,
    on_point: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Run the sweep ``config`` describes and return its result (nothing is printed).

    ``resume``: a result of an earlier, unfinished run of the same sweep; its points are
    kept and not measured again. ``on_point(result so far)`` after each point (to save it:
    nothing finished is lost to a crash). Ctrl-C raises :class:`BenchInterrupted`
    holding the finished points.

    ``progress`` receives dicts (``event``: start/tick/window/end, ``point``, ``points``,
    ``elapsed``, ``expected_seconds``, ``completed``, ``errors`` ...) from the bench's
    thread. Raises :class:`ServerUnreachable` / :class:`TargetNotServed` before the sweep;
    errors during the sweep are counted in the result, not raised.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise BenchError("run_bench is synchronous: call it from a thread without an event loop")
    images = (
        list(config.images)
        if isinstance(config.images, list | tuple)
        and config.images
        and all(isinstance(im, BenchImage) for im in config.images)
        else load_images(config.images)
    )
    max_in_flight = _fd_limit(config.max_in_flight)
    if max_in_flight < config.max_in_flight:
        log.warning("max_in_flight lowered to %d by the open-file limit", max_in_flight)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    sweep = _Sweep()
    if resume is not None:
        sweep.resumed_from(config, resume, config.plans(max_in_flight))
        sweep.server = resume.server

    def result() -> BenchResult:
        order = sorted(range(len(sweep.points)), key=lambda i: sweep.points[i].index)
        return BenchResult(
            command=list(sys.argv if command is None else command),
            config=_config_dict(config, images, max_in_flight),
            machine=machine_info(),
            server=sweep.server,
            points=[sweep.points[i] for i in order],
            rows=_concat_rows(sweep.rows),
            created=created,
            label=config.label,
        )

    after = None if on_point is None else (lambda: on_point(result()))
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_sweep(config, images, progress, max_in_flight, sweep, after))
    except KeyboardInterrupt:
        raise BenchInterrupted(result() if sweep.points else None) from None
    return result()
