"""One served model's settings: where it comes from and how it is batched, run and
preprocessed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cvserve.config.checks import ConfigError, duration_ms, flag, integer, number

#: Runtimes a model can be served with.
RUNTIMES: tuple[str, ...] = ("onnxruntime", "simulated", "torch")
#: Where a model's images can be preprocessed (``--preprocess``).
PREPROCESS_DEVICES: tuple[str, ...] = ("cpu", "gpu", "auto")


def queue_wait_ms(value: Any) -> float | None:
    """A ``max_queue_wait_ms`` setting: None or ``"auto"`` (automatic), or ms >= 0."""
    if value is None or value == "auto":
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not value >= 0
    ):
        raise ValueError(f"max_queue_wait_ms must be 'auto' or a number >= 0, not {value!r}")
    return float(value)


def parse_version_policy(text: Any) -> tuple[str, tuple[int, ...]]:
    """A ``version_policy`` setting, as Triton's: ``latest`` or ``latest:N`` (the N newest
    versions in the store), ``all``, or ``specific:1,3`` (those versions). Returns
    ``(kind, numbers)``: ``("latest", (N,))``, ``("all", ())``, ``("specific", (1, 3))``."""
    if not isinstance(text, str):
        raise ValueError(f"version_policy must be a string, not {text!r}")
    kind, _, arg = text.strip().partition(":")
    try:
        if kind == "all" and not arg:
            return "all", ()
        if kind == "latest":
            n = int(arg) if arg else 1
            if n >= 1:
                return "latest", (n,)
        if kind == "specific" and arg:
            nums = tuple(sorted({int(x) for x in arg.split(",")}))
            if all(v >= 1 for v in nums):
                return "specific", nums
    except ValueError:
        pass
    raise ValueError(
        f"version_policy {text!r}: use latest, latest:N, all or specific:V1,V2 (versions >= 1)"
    )


def select_versions(policy: str, available: Any) -> list[int]:
    """The versions of ``available`` (version numbers in the store) that ``policy`` serves,
    oldest first."""
    kind, nums = parse_version_policy(policy)
    have = sorted(set(available))
    if kind == "all":
        return have
    if kind == "latest":
        return have[-nums[0] :]
    return [v for v in have if v in nums]


@dataclass(frozen=True)
class BatchConfig:
    """Batching and admission settings of one model."""

    #: Largest batch the batcher builds (flag ``--max-batch-size``).
    max_batch_size: int = 8
    #: How long a batch's first request waits for more before the batch runs.
    max_delay_ms: float = 5.0
    #: Runtime sessions of the model, each running batches on its own thread.
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
        integer("max_batch_size", self.max_batch_size, 1)
        duration_ms("max_delay_ms", self.max_delay_ms, positive=False)
        integer("instances", self.instances, 1)
        integer("max_queue", self.max_queue, 1)
        duration_ms("timeout_ms", self.timeout_ms, positive=True)


@dataclass(frozen=True)
class ModelConfig:
    """One served model: where it comes from and how it is batched, run and preprocessed."""

    #: The name requests use (``/v1/models/NAME:predict``).
    name: str
    #: Store name of the model (defaults to ``name``): serve one model under two names.
    model: str | None = None
    batching: BatchConfig = field(default_factory=BatchConfig)
    #: onnxruntime intra-op threads per instance; 0 = cores / instances.
    intra_op_threads: int = 0
    #: How JPEGs become pixels: ``simplejpeg`` (libjpeg-turbo at a power-of-two scale, the default), ``pil-reduced``, ``opencv`` or ``pil``.
    decoder: str = "simplejpeg"
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
    #: Which of the model's versions in the store are served (Triton's version policy):
    #: ``latest`` / ``latest:N``, ``all``, ``specific:1,3``. Requests without a version go
    #: to the newest one loaded.
    version_policy: str = "latest:1"
    #: A head of your own, ``"package.module:Class"`` (``cvserve.tasks.base.TaskHead``),
    #: in place of the head of the model's task; imported and checked at start-up.
    head: str | None = None
    #: ``runtime: torch`` only (``cvserve.runtime.torchrt``): ``torch.compile`` the program,
    #: channels-last memory format, autocast precision on a GPU (``fp32``, ``fp16``,
    #: ``bf16``), one CUDA graph per batch size bucket on a GPU.
    torch_compile: bool = False
    channels_last: bool = False
    precision: str = "fp32"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        try:
            integer("intra_op_threads", self.intra_op_threads, 0)
            flag("fp16", self.fp16)
            parse_version_policy(self.version_policy)
        except ValueError as e:
            raise ConfigError(f"model {self.name!r}: {e}") from None
        if self.head is not None:
            from cvserve.tasks.base import HeadError, load_head

            if not isinstance(self.head, str):
                raise ConfigError(f"model {self.name!r}: head must be 'package.module:Class'")
            try:
                load_head(self.head)
            except HeadError as e:
                raise ConfigError(f"model {self.name!r}: {e}") from None
        self._check_device()
        self._check_torch()
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
        if (
            isinstance(self.sim_devices, bool)
            or not isinstance(self.sim_devices, int)
            or self.sim_devices < 1
        ):
            raise ConfigError(f"model {self.name!r}: sim_devices must be an integer >= 1")
        if self.sim_h2d_gbps is not None:
            try:
                number("sim_h2d_gbps", self.sim_h2d_gbps, above=0, unit="GB/s")
            except ValueError as e:
                raise ConfigError(f"model {self.name!r}: {e}") from None

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
                opt
                for opt, on in (
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

    def _check_torch(self) -> None:
        try:
            for key in ("torch_compile", "channels_last", "cuda_graphs"):
                flag(key, getattr(self, key))
        except ValueError as e:
            raise ConfigError(f"model {self.name!r}: {e}") from None
        torch_only = [
            opt
            for opt, on in (
                ("--torch-compile", self.torch_compile),
                ("--channels-last", self.channels_last),
                (f"--precision {self.precision}", self.precision != "fp32"),
                ("--cuda-graphs", self.cuda_graphs),
            )
            if on
        ]
        ort_only = [
            opt
            for opt, on in (
                ("--fp16 (use --precision fp16)", self.fp16),
                ("--trt-cache", self.trt_cache is not None),
                (f"--gpu-provider {self.gpu_provider}", self.gpu_provider != "auto"),
            )
            if on
        ]
        if ort_only and self.runtime == "torch":
            raise ConfigError(
                f"model {self.name!r}: {', '.join(ort_only)} are onnxruntime's; the torch "
                "runtime takes --precision, --torch-compile, --channels-last, --cuda-graphs"
            )
        if torch_only and self.runtime != "torch":
            raise ConfigError(
                f"model {self.name!r}: {', '.join(torch_only)} need(s) --runtime torch"
            )
        from cvserve.runtime.torchrt import TorchOptions

        try:
            TorchOptions(device=self.device, precision=self.precision,
                         cuda_graphs=self.cuda_graphs)  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"model {self.name!r}: {e}") from None

    @property
    def store_name(self) -> str:
        return self.model or self.name
