"""One served multi-DNN pipeline's settings, and the DNNs each pipeline kind opens (so
that a per-DNN profile is checked here, below ``serving``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cvserve.config.checks import ConfigError, duration_ms, integer
from cvserve.config.model import RUNTIMES, queue_wait_ms

#: The DNNs each stage of each pipeline kind opens (``serving.pipelines``' kinds read
#: their ``dnns`` from here): the names a per-DNN ``sim_profile`` may use.
PIPELINE_DNNS: dict[str, dict[str, tuple[str, ...]]] = {
    "ocr": {"det": ("det",), "rec": ("cls", "rec")},
    "detect-classify": {"detect": ("det",), "classify": ("cls",)},
}
#: The pipeline kinds cvserve serves.
PIPELINE_KINDS: tuple[str, ...] = tuple(PIPELINE_DNNS)


def pipeline_dnns(kind: str) -> dict[str, tuple[str, ...]]:
    """The DNNs of each stage of ``kind``; ValueError for an unknown kind."""
    try:
        return PIPELINE_DNNS[kind]
    except KeyError:
        raise ValueError(
            f"unknown pipeline kind {kind!r}; known: {', '.join(PIPELINE_KINDS)}"
        ) from None


@dataclass(frozen=True)
class PipelineConfig:
    """One served multi-DNN pipeline (see ``cvserve.serving.pipelines``)."""

    #: The name requests use (``/v1/pipelines/NAME:predict``).
    name: str
    kind: str = ""  # "ocr" | "detect-classify"; defaults to ``name``
    #: Stage B workers inside the serving process (0: only ``cvserve worker`` processes;
    #: None: one per core of the CPU budget, so that under load every core runs a call).
    #: YAML ``stage_workers`` (it was ``workers``, now the server's process count).
    stage_workers: int | None = None
    #: Stage B model instances per worker process (``cvserve worker``).
    instances: int = 1
    #: Largest batch of stage B items a worker takes at once.
    max_batch_size: int = 16
    #: How long a stage B worker waits for a first item before looking again.
    block_ms: int = 50
    #: Items a worker left unacknowledged and untouched this long are taken over by another
    #: (live workers touch theirs while they run: ``brokers.consumer.DEFAULT_RECLAIM_IDLE_MS``).
    reclaim_idle_ms: int = 5_000
    #: Deliveries of one item before a worker moves it to the dead letters (``<topic>.dead``)
    #: and answers its request with an error, instead of taking it again.
    max_deliveries: int = 3
    #: A server's reply stream expires this long after the server stops refreshing it.
    reply_ttl_ms: int = 60_000
    #: Requests waiting for results fail with 503 once the broker stays unreachable this
    #: long (a broker that comes back without their items gets them published again).
    broker_outage_ms: int = 5_000
    #: Requests admitted at once; more get a 429.
    max_queue: int = 64
    #: Default per-request deadline; a request past it gets a 504.
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
    #: The kind's own parameters (detect-classify: ``objects``, ``classifier`` ...).
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
        # the durations in ms here are whole milliseconds: the broker takes integers
        for key in (
            "max_batch_size", "max_queue", "instances", "block_ms", "reclaim_idle_ms",
            "max_deliveries", "reply_ttl_ms", "broker_outage_ms",
        ):  # fmt: skip
            integer(key, getattr(self, key), 1)
        if self.stage_workers is not None:
            integer("stage_workers", self.stage_workers, 0)
        integer("intra_op_threads", self.intra_op_threads, 0)
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < -1:
            raise ValueError(
                f"cores must be an integer >= 0, or -1 for no CPU budget, not {self.cores!r}"
            )
        duration_ms("timeout_ms", self.timeout_ms, positive=True)
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a mapping, not {self.params!r}")

    def _check_runtime(self) -> None:
        where = f"pipeline {self.name!r}"
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"{where}: runtime {self.runtime!r}; choose one of {', '.join(RUNTIMES)}"
            )
        if self.runtime == "torch":
            raise ConfigError(f"{where}: the torch runtime serves models (--model) only; a "
                              "pipeline's stages run onnxruntime or simulated")  # fmt: skip
        if self.runtime != "simulated":
            if self.sim_profile:
                raise ConfigError(f"{where}: sim_profile needs the simulated runtime "
                                  "(runtime: simulated / --runtime simulated)")  # fmt: skip
            return
        if (
            isinstance(self.sim_devices, bool)
            or not isinstance(self.sim_devices, int)
            or self.sim_devices < 1
        ):
            raise ConfigError(f"{where}: sim_devices must be an integer >= 1")
        profiles = self.sim_profile
        if not profiles:
            raise ConfigError(
                f"{where}: the simulated runtime needs a latency profile (sim_profile / "
                "--sim-profile: '1:0.9,8:2.4', a JSON file, a packaged name, or one per DNN)"
            )
        from cvserve.runtime.simulated import SimProfile

        if isinstance(profiles, dict):
            try:
                stages = pipeline_dnns(self.kind or self.name).values()
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
        return replace(self, instances=n)
