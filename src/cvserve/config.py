"""Typed configuration of models, batching and the server, from flags or a YAML file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cvserve.images.decode import DEFAULT_MAX_PIXELS

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot work."""


#: Runtimes a model can be served with.
RUNTIMES: tuple[str, ...] = ("onnxruntime", "simulated")
#: Where a model's images can be preprocessed (``--preprocess``).
PREPROCESS_DEVICES: tuple[str, ...] = ("cpu", "gpu", "auto")


def queue_wait_ms(value: Any) -> float | None:
    """A ``max_queue_wait_ms`` setting: None or ``"auto"`` (automatic), or ms >= 0."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"max_queue_wait_ms must be 'auto' or a number >= 0, not {value!r}")
    return float(value)


def default_pixels_in_flight(max_pixels: int, bytes_per_pixel: int = 12) -> int:
    """Half the memory available now (``MemAvailable``, or the cgroup's limit if lower) at
    ``bytes_per_pixel`` (a decoded RGB pixel and its working copies), at least one
    ``max_pixels`` image."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw.isdigit():
            avail = min(avail or int(raw), int(raw))
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    return max(max_pixels, avail // 2 // bytes_per_pixel)


@dataclass(frozen=True)
class BatchConfig:
    """Batching and admission settings of one model."""

    max_batch_size: int = 8
    max_delay_ms: float = 5.0
    instances: int = 1
    #: Requests admitted at once (preprocessing, waiting or running); more get a 429.
    max_queue: int = 64
    #: Default per-request deadline; a request past it gets a 504.
    timeout_ms: float = 30_000.0
    #: A request whose expected wait (queue ahead / measured service rate + one batch)
    #: exceeds this, or its deadline, gets a 429 at once. None ("auto"): the time to serve
    #: a few full rounds of batches (``serving.core.AUTO_WAIT_ROUNDS`` on an accelerator,
    #: ``CPU_WAIT_ROUNDS`` on a CPU); 0: off.
    max_queue_wait_ms: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_queue_wait_ms", queue_wait_ms(self.max_queue_wait_ms))
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_delay_ms < 0:
            raise ValueError("max_delay_ms must be >= 0")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """One served model: where it comes from and how it is batched, run and preprocessed."""

    name: str
    #: Store name of the model (defaults to ``name``): serve one model under two names.
    model: str | None = None
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: onnxruntime intra-op threads per instance; 0 = cores / instances.
    intra_op_threads: int = 0
    decoder: str = "pil-reduced"
    #: Overrides of the model's own PreprocessSpec fields (e.g. ``interpolation``).
    preprocess: dict[str, Any] = field(default_factory=dict)
    #: ``"onnxruntime"``, or ``"simulated"``: an accelerator that takes ``sim_profile``'s
    #: time per batch and burns no host CPU (see ``cvserve.runtime.simulated``).
    runtime: str = "onnxruntime"
    #: Latency per batch size: ``"1:0.9,8:2.4"`` (ms), a profile JSON file, or a packaged
    #: profile's name (``resnet50-trt-a100``). Required when ``runtime`` is simulated.
    sim_profile: str | None = None
    #: Simulated devices shared by the instances; each runs one batch at a time.
    sim_devices: int = 1
    #: Host<->device copy rate in GB/s (no copy time when None).
    sim_h2d_gbps: float | None = None
    #: ``cpu``, or ``cuda[:N]``: onnxruntime's TensorRT provider when present, else CUDA,
    #: else an error at start-up (see ``cvserve.runtime.providers``).
    device: str = "cpu"
    #: On a GPU: ``auto`` (TensorRT, else CUDA), ``tensorrt`` or ``cuda``.
    gpu_provider: str = "auto"
    #: Let TensorRT build FP16 kernels.
    fp16: bool = False
    #: TensorRT engine cache directory (default: ``trt/`` in the model cache).
    trt_cache: str | None = None
    #: Where images are decoded and resized: ``cpu``, ``gpu`` (nvJPEG; other formats and
    #: failures fall back to the CPU per image) or ``auto`` (per image, whichever is sooner).
    preprocess_device: str = "cpu"

    def __post_init__(self) -> None:
        self._check_device()
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"model {self.name!r}: runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.runtime == "simulated":
            if not self.sim_profile:
                raise ConfigError(
                    f"model {self.name!r}: the simulated runtime needs a latency profile "
                    "(sim_profile / --sim-profile: '1:0.9,8:2.4', a JSON file, or a packaged name)"
                )
            from cvserve.runtime.simulated import SimProfile

            try:
                SimProfile.parse(self.sim_profile)
            except ValueError as e:
                raise ConfigError(f"model {self.name!r}: {e}") from None
        elif self.sim_profile or self.sim_h2d_gbps is not None:
            raise ConfigError(
                f"model {self.name!r}: sim_profile/sim_h2d_gbps need the simulated runtime "
                "(runtime: simulated / --runtime simulated)"
            )
        if not isinstance(self.sim_devices, int) or self.sim_devices < 1:
            raise ConfigError(f"model {self.name!r}: sim_devices must be an integer >= 1")
        if self.sim_h2d_gbps is not None and not self.sim_h2d_gbps > 0:
            raise ConfigError(f"model {self.name!r}: sim_h2d_gbps must be > 0")

    def _check_device(self) -> None:
        from cvserve.runtime.providers import PROVIDER_CHOICES, parse_device

        try:
            dev = parse_device(self.device)
        except ValueError as e:
            raise ConfigError(f"model {self.name!r}: {e}") from None
        if self.gpu_provider not in PROVIDER_CHOICES:
            raise ConfigError(
                f"model {self.name!r}: gpu_provider {self.gpu_provider!r}; "
                f"choose one of {', '.join(PROVIDER_CHOICES)}"
            )
        if self.preprocess_device not in PREPROCESS_DEVICES:
            raise ConfigError(
                f"model {self.name!r}: preprocess {self.preprocess_device!r}; "
                f"choose one of {', '.join(PREPROCESS_DEVICES)}"
            )
        if dev.is_gpu and self.runtime == "simulated":
            raise ConfigError(
                f"model {self.name!r}: --device {self.device} runs onnxruntime on a GPU; the "
                "simulated runtime is its own device (drop one of them)"
            )
        if not dev.is_gpu:
            gpu_only = [
                flag
                for flag, on in (
                    (f"--preprocess {self.preprocess_device}", self.preprocess_device != "cpu"),
                    ("--fp16", self.fp16),
                    ("--trt-cache", self.trt_cache is not None),
                    (f"--gpu-provider {self.gpu_provider}", self.gpu_provider != "auto"),
                )
                if on
            ]
            if gpu_only:
                raise ConfigError(
                    f"model {self.name!r}: {', '.join(gpu_only)} need(s) a GPU: add "
                    "--device cuda[:N] (device: cuda in a config file)"
                )

    @property
    def store_name(self) -> str:
        return self.model or self.name


@dataclass(frozen=True)
class PipelineConfig:
    """One served multi-DNN pipeline (see ``cvserve.serving.pipelines``)."""

    name: str
    kind: str = ""  # "ocr" | "detect-classify"; defaults to ``name``
    #: Stage B workers inside the serving process (0: only ``cvserve worker`` processes;
    #: None: one per core of the CPU budget, so that under load every core runs a call).
    #: YAML ``stage_workers`` (it was ``workers``, now the server's process count).
    stage_workers: int | None = None
    #: Stage B model instances per worker process (``cvserve worker``).
    instances: int = 1
    max_batch_size: int = 16
    #: How long a stage B worker waits for a first item before looking again.
    block_ms: int = 50
    #: Items a worker left unacknowledged and untouched this long are taken over by another
    #: (live workers touch theirs while they run: ``brokers.worker.DEFAULT_RECLAIM_IDLE_MS``).
    reclaim_idle_ms: int = 5_000
    #: Deliveries of one item before a worker moves it to the dead letters (``<topic>.dead``)
    #: and answers its request with an error, instead of taking it again.
    max_deliveries: int = 3
    #: A server's reply stream expires this long after the server stops refreshing it.
    reply_ttl_ms: int = 60_000
    #: Requests waiting for results fail with 503 once the broker stays unreachable this
    #: long (a broker that comes back without their items gets them published again).
    broker_outage_ms: int = 5_000
    max_queue: int = 64
    timeout_ms: float = 30_000.0
    #: As a model's (``BatchConfig.max_queue_wait_ms``), but off (0) by default: a
    #: pipeline's requests fan out into a number of items that varies per image, so
    #: requests per second predict its wait poorly; the deadline still refuses at once.
    #: "auto" counts rounds of the preprocessing pool's threads (stage A runs there).
    max_queue_wait_ms: float | None = 0.0
    #: The widest one DNN call of a stage may run (0: all of ``cores``).
    intra_op_threads: int = 0
    #: Cores the stages' DNN calls share in each process (``runtime.budget``): 0, all this
    #: process may use; -1, no budget (every session takes onnxruntime's own threads).
    cores: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    #: As a model's: ``"onnxruntime"``, or ``"simulated"`` for every DNN of the stages this
    #: process runs (stage A in the server, stage B in its workers or ``cvserve worker``).
    runtime: str = "onnxruntime"
    #: The simulated runtime's latency per batch size: one profile for every DNN, or one
    #: per DNN name (``{"det": "1:5", "cls": "1:20,16:100"}``; ocr: det, cls, rec;
    #: detect-classify: det, cls).
    sim_profile: str | dict[str, str] | None = None
    #: Simulated devices per DNN in each process; each runs one batch at a time.
    sim_devices: int = 1

    def __post_init__(self) -> None:
        self._check_runtime()
        if not self.kind:
            object.__setattr__(self, "kind", self.name)
        object.__setattr__(self, "max_queue_wait_ms", queue_wait_ms(self.max_queue_wait_ms))
        for key in (
            "max_batch_size", "max_queue", "instances", "block_ms", "reclaim_idle_ms",
            "max_deliveries", "reply_ttl_ms", "broker_outage_ms",
        ):  # fmt: skip
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.stage_workers is not None and self.stage_workers < 0:
            raise ValueError("stage_workers must be >= 0")
        if self.cores < -1:
            raise ValueError("cores must be >= 0, or -1 for no CPU budget")
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")

    def _check_runtime(self) -> None:
        where = f"pipeline {self.name!r}"
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"{where}: runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.runtime != "simulated":
            if self.sim_profile:
                raise ConfigError(f"{where}: sim_profile needs the simulated runtime "
                                  "(runtime: simulated / --runtime simulated)")  # fmt: skip
            return
        if not isinstance(self.sim_devices, int) or self.sim_devices < 1:
            raise ConfigError(f"{where}: sim_devices must be an integer >= 1")
        profiles = self.sim_profile
        if not profiles:
            raise ConfigError(
                f"{where}: the simulated runtime needs a latency profile (sim_profile / "
                "--sim-profile: '1:0.9,8:2.4', a JSON file, a packaged name, or one per DNN)"
            )
        from cvserve.runtime.simulated import SimProfile

        if isinstance(profiles, dict):
            from cvserve.serving.pipelines import get_kind

            try:
                stages = get_kind(self.kind or self.name).dnns.values()
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            dnns = {d for names in stages for d in names}
            unknown = sorted(set(profiles) - dnns)
            if unknown:
                raise ConfigError(f"{where}: sim_profile names no DNN of this pipeline: "
                                  f"{unknown}; its DNNs: {', '.join(sorted(dnns))}")  # fmt: skip
        else:
            profiles = {"*": profiles}
        for dnn, spec in profiles.items():
            try:
                SimProfile.parse(spec)
            except (TypeError, ValueError) as e:
                of = "" if dnn == "*" else f" of {dnn}"
                raise ConfigError(f"{where}: sim_profile{of}: {e}") from None

    def with_instances(self, n: int) -> PipelineConfig:
        from dataclasses import replace

        return replace(self, instances=n)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server and the resources its models share."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: KServe v2 gRPC (``tritonclient.grpc``) on this port too, in the same process; None:
    #: off, 0: any free port.
    grpc_port: int | None = None
    #: Threads that decode, resize and normalize (shared by all models); 0 = cores.
    preprocess_threads: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Decoded pixels in flight at once, server-wide (counted from the headers before
    #: decoding); an image that does not fit gets a 429. 0: ``default_pixels_in_flight``.
    max_pixels_in_flight: int = 0
    #: How long SIGTERM waits for in-flight requests before exiting anyway.
    drain_timeout_s: float = 30.0
    #: After SIGTERM, how long the server keeps serving new work (readiness already fails,
    #: responses say ``Connection: close``) so a load balancer can stop sending to it.
    drain_delay_s: float = 0.0
    #: Join ``port`` with SO_REUSEPORT (several servers on one port, the kernel spreading
    #: connections); the server joins once its models are loaded.
    reuse_port: bool = False
    #: Server processes sharing ``port`` (SO_REUSEPORT; ``cvserve.serving.workers``): each
    #: loads every model, and a parent starts, watches and stops them. 1: this process.
    workers: int = 1
    #: A file of API keys, one a line: requests need ``Authorization: Bearer KEY``.
    api_key_file: str | None = None
    #: TLS certificate chain and private key (PEM files) for HTTP and gRPC.
    tls_cert: str | None = None
    tls_key: str | None = None
    #: ``/metrics`` (and ``/healthz``, ``/readyz``) on this port of its own, plain HTTP and
    #: without API keys; None: ``/metrics`` on the main port.
    metrics_port: int | None = None
    #: HTTP limits before trust (``cvserve.serving.protocol``). Request line and headers
    #: together, in bytes (431 above): 64 KiB, what an AWS ALB forwards, room for large
    #: bearer tokens and cookies, yet a 200 MB header costs nothing.
    max_header_bytes: int = 64 * 1024
    #: Header fields in one request (431 above): 100, Apache's LimitRequestFields.
    max_headers: int = 100
    #: A connection with no request under way (a new one too) is closed after this long:
    #: 30 s, uvicorn's value here before these limits: a client pool reusing connections
    #: seldom meets a close, and idle sockets still go.
    keep_alive_timeout_s: float = 30.0
    #: From a request's first byte, its headers must be complete within this (slowloris;
    #: 408 after it): 20 s, Apache mod_reqtimeout's default.
    header_timeout_s: float = 20.0
    #: A request body that receives no byte for this long is closed (inactivity, so a slow
    #: but steady upload always succeeds): 30 s, half of nginx's client_body_timeout (60 s).
    body_timeout_s: float = 30.0
    #: Open HTTP connections; over it the least recently active one with no request under
    #: way is closed (503 if every one is busy). 0: three quarters of the descriptor
    #: limit, at most 4096 (each idle connection costs about 10 KB).
    max_connections: int = 0
    cache_dir: str | None = None
    #: Where pipeline stages meet: ``inprocess://`` (default) or ``redis://host:port``.
    broker: str = "inprocess://"
    models: tuple[ModelConfig, ...] = ()
    pipelines: tuple[PipelineConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.grpc_port is not None:
            if isinstance(self.grpc_port, bool) or not isinstance(self.grpc_port, int):
                raise ConfigError(f"grpc_port must be an integer port, not {self.grpc_port!r}")
            if not 0 <= self.grpc_port <= 65535:
                raise ConfigError(f"grpc_port {self.grpc_port} is not a port (0-65535)")
            if self.grpc_port and self.grpc_port == self.port:
                raise ConfigError(f"grpc_port and port are both {self.port}: use two ports")
        if self.metrics_port is not None:
            if isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int):
                raise ConfigError(
                    f"metrics_port must be an integer port, not {self.metrics_port!r}"
                )
            if not 0 <= self.metrics_port <= 65535:
                raise ConfigError(f"metrics_port {self.metrics_port} is not a port (0-65535)")
            if self.metrics_port and self.metrics_port in (self.port, self.grpc_port):
                raise ConfigError(f"metrics_port {self.metrics_port} is taken by another door")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, not {self.workers!r}")
        if self.workers > 1 and self.grpc_port is not None:
            raise ConfigError(
                f"grpc_port with workers {self.workers}: the gRPC port is not shared between "
                "server processes; serve gRPC with workers 1 (or one server per gRPC port)"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate (tls_cert) and its key (tls_key)")
        for key in ("drain_timeout_s", "drain_delay_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{key} must be a number of seconds >= 0, not {value!r}")
        for key in ("keep_alive_timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{key} must be a number of seconds > 0, not {value!r}")
        for key, least in (("max_header_bytes", 1024), ("max_headers", 1), ("max_connections", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{key} must be an integer >= {least}, not {value!r}")
        if self.max_pixels_in_flight and not self.max_pixels_in_flight >= self.max_pixels:
            raise ConfigError(
                f"max_pixels_in_flight ({self.max_pixels_in_flight}) must hold one image of "
                f"max_pixels ({self.max_pixels}), or be 0 (from the memory available)"
            )

    def resolved_preprocess_threads(self) -> int:
        return self.preprocess_threads or (os.cpu_count() or 1)

    def resolved_pixels_in_flight(self) -> int:
        return self.max_pixels_in_flight or default_pixels_in_flight(self.max_pixels)


_BATCH_KEYS = {f.name for f in fields(BatchConfig)}
_MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"batching"}
_SERVER_KEYS = {f.name for f in fields(ServerConfig)} - {"models", "pipelines"}
_PIPELINE_KEYS = {f.name for f in fields(PipelineConfig)}


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A model entry of a config file: ModelConfig keys and BatchConfig keys, flat."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a model entry needs at least a name: {d!r}")
    unknown = set(d) - _BATCH_KEYS - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"model {d['name']!r}: unknown keys {sorted(unknown)}; "
            f"known: {sorted(_BATCH_KEYS | _MODEL_KEYS)}"
        )
    try:
        batching = BatchConfig(**{k: v for k, v in d.items() if k in _BATCH_KEYS})
        return ModelConfig(batching=batching, **{k: v for k, v in d.items() if k in _MODEL_KEYS})
    except ConfigError:
        raise  # ModelConfig's own errors name the model already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {d['name']!r}: {e}") from None


def pipeline_config_from_dict(d: dict[str, Any]) -> PipelineConfig:
    """A pipeline entry of a config file: PipelineConfig keys."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a pipeline entry needs at least a name: {d!r}")
    if "workers" in d:  # renamed: ``workers`` is now the server's process count
        raise ConfigError(
            f"pipeline {d['name']!r}: 'workers' is now 'stage_workers' (stage B workers in "
            "the server process; server: workers is the number of server processes)"
        )
    unknown = set(d) - _PIPELINE_KEYS
    if unknown:
        raise ConfigError(
            f"pipeline {d['name']!r}: unknown keys {sorted(unknown)}; known: {sorted(_PIPELINE_KEYS)}"
        )
    try:
        return PipelineConfig(**d)
    except ConfigError:
        raise  # PipelineConfig's own errors name the pipeline already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pipeline {d['name']!r}: {e}") from None


def server_config_from_dict(d: dict[str, Any]) -> ServerConfig:
    if d is not None and not isinstance(d, dict):
        raise ConfigError(
            f"a config is a mapping with 'server', 'models' and 'pipelines'; got {type(d).__name__}"
        )
    d = dict(d or {})
    models = d.pop("models", None) or []
    pipelines = d.pop("pipelines", None) or []
    server = d.pop("server", None) or {}
    for key, value, kind in (("models", models, list), ("pipelines", pipelines, list),
                             ("server", server, dict)):  # fmt: skip
        if not isinstance(value, kind):
            raise ConfigError(f"{key!r} must be a {kind.__name__}, got {type(value).__name__}")
    if d:
        raise ConfigError(
            f"unknown top-level keys {sorted(d)}; expected 'server', 'models' and 'pipelines'"
        )
    unknown = set(server) - _SERVER_KEYS
    if unknown:
        raise ConfigError(f"server: unknown keys {sorted(unknown)}; known: {sorted(_SERVER_KEYS)}")
    if not models and not pipelines:
        raise ConfigError("the config serves nothing: add a 'models' or 'pipelines' list")
    mcs = tuple(model_config_from_dict(m) for m in models)
    pcs = tuple(pipeline_config_from_dict(p) for p in pipelines)
    for what, names in (("model", [m.name for m in mcs]), ("pipeline", [p.name for p in pcs])):
        if len(set(names)) != len(names):
            raise ConfigError(f"{what} names must be unique: {names}")
    both = sorted({m.name for m in mcs} & {p.name for p in pcs})
    if both:  # one name, one thing served: the front doors look names up in one table
        raise ConfigError(f"a model and a pipeline may not share a name: {both}")
    try:
        return ServerConfig(models=mcs, pipelines=pcs, **server)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"server: {e}") from None


def config_to_dict(config: ServerConfig) -> dict[str, Any]:
    """``config`` as a config file says it (``server_config_from_dict`` reads it back):
    how ``--workers`` hands its processes their settings, as JSON, never pickle."""
    from dataclasses import asdict

    def model(mc: ModelConfig) -> dict[str, Any]:
        d = asdict(mc)
        return {**d.pop("batching"), **d}

    server = asdict(config)
    del server["models"], server["pipelines"]
    return {
        "server": server,
        "models": [model(mc) for mc in config.models],
        "pipelines": [asdict(pc) for pc in config.pipelines],
    }


def load_config(path: str | Path) -> ServerConfig:
    """Read a YAML config file (see README, "Serving several models")."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    return server_config_from_dict(data or {})
