"""One served multi-DNN pipeline's settings: its steps (``config.graph``), given or a
preset's (``config/presets/*.yaml``), and how it is served."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from cvserve.config.checks import ConfigError, duration_ms, integer
from cvserve.config.graph import Step, parse_steps
from cvserve.config.model import RUNTIMES, queue_wait_ms

#: The pipelines cvserve ships, written as steps (``config/presets/<kind>.yaml``).
PRESETS: tuple[str, ...] = ("ocr", "detect-classify", "detect-embed")
#: The pipeline kinds cvserve serves: its presets, and ``graph`` (steps of one's own).
PIPELINE_KINDS: tuple[str, ...] = (*PRESETS, "graph")
#: A preset's settings (``params``) -> (step, field) of its steps they set.
PRESET_PARAMS: dict[str, dict[str, tuple[str, str]]] = {
    "ocr": {"use_cls": ("rec", "params.use_cls")},
    "detect-classify": {"detector": ("detect", "model"), "classifier": ("classify", "model"),
                        "objects": ("detect", "params.top_k")},
    "detect-embed": {"detector": ("detect", "model"), "embedder": ("embed", "model"),
                     "objects": ("detect", "params.top_k"), "margin": ("crops", "margin"),
                     "gallery": ("", "gallery"), "neighbours": ("", "neighbours")},
}  # fmt: skip


def preset(kind: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The steps and answer of preset ``kind`` with ``params`` applied to them."""
    import copy
    from importlib import resources

    import yaml

    if kind not in PRESETS:
        raise ValueError(f"unknown pipeline kind {kind!r}; known: {', '.join(PIPELINE_KINDS)}")
    text = resources.files("cvserve.config").joinpath(f"presets/{kind}.yaml").read_text()
    doc = copy.deepcopy(yaml.safe_load(text))
    steps = {s["name"]: s for s in doc["steps"]}
    known = PRESET_PARAMS[kind]
    for key, value in (params or {}).items():
        if key not in known:
            continue  # kept for the kind's own use (an unknown one is refused below)
        step, path = known[key]
        if not step:  # a step added by the setting (the gallery of detect-embed)
            continue
        *parents, last = path.split(".")
        node = steps[step]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if kind == "detect-embed" and (params or {}).get("gallery"):
        doc["steps"].append({"name": "gallery", "gallery": "embed", "file": str(params["gallery"]),
                             "k": int(params.get("neighbours", 1))})  # fmt: skip
    unknown = set(params or {}) - set(known)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)} of preset {kind}; "
                         f"known: {', '.join(sorted(known)) or 'none'}")  # fmt: skip
    return doc


#: The answer shapes a pipeline can give (see ``PipelineConfig.answer``).
ANSWERS = ("graph", "ocr", "detect-classify")


@dataclass(frozen=True)
class PipelineConfig:
    """One served multi-DNN pipeline (see ``cvserve.serving.pipelines``)."""

    #: The name requests use (``/v1/pipelines/NAME:predict``).
    name: str
    #: A preset ("ocr", "detect-classify", "detect-embed"; default: ``name``), or "graph"
    #: (the default where ``steps`` are given): what the steps are when none are given.
    kind: str = ""
    #: The pipeline as data: named steps (``config.graph``; docs/pipelines.md). Empty: the
    #: preset ``kind``'s steps, with ``params`` applied to them.
    steps: list[dict[str, Any]] | None = None
    #: The answer's shape: "graph" (one key per step, nested per crop), or a preset's own
    #: ("ocr": lines; "detect-classify": objects). Default: the preset's, else "graph".
    answer: str = ""
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
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a mapping, not {self.params!r}")
        if not self.kind:
            object.__setattr__(self, "kind", "graph" if self.steps else self.name)
        if not self.steps:
            if self.kind not in PRESETS:
                raise ConfigError(
                    f"pipeline {self.name!r}: give its steps, or a kind of "
                    f"{', '.join(PRESETS)} (not {self.kind!r})"
                )
            try:
                doc = preset(self.kind, self.params)
            except ValueError as e:
                raise ConfigError(f"pipeline {self.name!r}: {e}") from None
            object.__setattr__(self, "steps", doc["steps"])
            if not self.answer:
                object.__setattr__(self, "answer", doc.get("answer", "graph"))
        if not self.answer:
            object.__setattr__(self, "answer", "graph")
        if self.answer not in ANSWERS:
            raise ConfigError(f"pipeline {self.name!r}: answer must be one of "
                              f"{', '.join(ANSWERS)}, not {self.answer!r}")  # fmt: skip
        parsed = parse_steps(self.steps, f"pipeline {self.name!r}")
        object.__setattr__(self, "_parsed", parsed)
        self._check_runtime()
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
            dnns = self.dnns()
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

    @property
    def graph_steps(self) -> tuple[Step, ...]:
        """The steps, parsed and value-checked (their graph is checked at load)."""
        return self._parsed  # type: ignore[attr-defined]

    def dnns(self) -> set[str]:
        return {d for s in self.graph_steps for d in s.dnns()}

    def with_instances(self, n: int) -> PipelineConfig:
        return replace(self, instances=n)
