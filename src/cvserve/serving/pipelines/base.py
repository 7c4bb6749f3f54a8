"""What every pipeline step shares: the options its DNNs open with (threads, CPU budget,
the simulated runtime), and the result headers a broker step's worker sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cvserve.runtime import Runtime
    from cvserve.runtime.budget import CpuBudget

#: Result headers a stage B sets so the server can break down its time (seconds).
INFER_S = "infer_s"
POST_S = "post_s"
BATCH = "batch"
#: Set (to 1) on the results of a stage B that ran on the simulated accelerator, so the
#: server marks the request ``sim=1`` even when the stage ran in another process.
SIMULATED = "sim"


@dataclass(frozen=True)
class StageOptions:
    """Knobs every stage understands."""

    #: The widest a DNN call may run (0: the whole budget, or onnxruntime's choice).
    intra_op_threads: int = 0
    max_pixels: int = 64_000_000
    cache_dir: str | None = None  # the model store, for kinds built from zoo models
    params: dict[str, Any] = field(default_factory=dict)  # kind-specific settings
    #: The cores this process's stages share (None: every session takes its own threads).
    budget: CpuBudget | None = None
    #: ``"onnxruntime"``, or ``"simulated"``: every DNN opened with these options takes its
    #: profile's time per batch and burns no host CPU (``cvserve.runtime.simulated``).
    runtime: str = "onnxruntime"
    #: The simulated runtime's latency profile: one spec for every DNN, or one per DNN
    #: name (``{"det": "1:5", "cls": "1:20,16:100"}``; see ``config.graph.Step.dnns``).
    sim_profile: str | Mapping[str, str] | None = None
    #: Simulated devices per DNN, shared by every stage opened with these options.
    sim_devices: int = 1
    #: DNN name -> (SimDevice, SimModel) of this process, made on first use.
    _sim: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def simulated(self) -> bool:
        return self.runtime == "simulated"


def sim_profile_of(profile: str | Mapping[str, str] | None, dnn: str) -> str:
    """The profile spec DNN ``dnn`` runs with (ValueError when there is none)."""
    if isinstance(profile, Mapping):
        if dnn not in profile:
            raise ValueError(
                f"the simulated runtime has no profile for DNN {dnn!r} "
                f"(sim_profile names {', '.join(sorted(profile)) or 'none'})"
            )
        return profile[dnn]
    if not profile:
        raise ValueError("the simulated runtime needs a latency profile (sim_profile)")
    return profile


def open_stage_model(path: str | Path, options: StageOptions, stage: str) -> Runtime:
    """A DNN of stage ``stage``: on the simulated accelerator when the options say so
    (its device shared by every stage of this process), else onnxruntime under the
    options' CPU budget when there is one."""
    from cvserve.runtime import OrtOptions, open_runtime

    width = OrtOptions(intra_op_threads=options.intra_op_threads)
    if options.simulated:
        from cvserve.runtime.simulated import SimDevice, SimModel

        if stage not in options._sim:
            device = SimDevice(sim_profile_of(options.sim_profile, stage), options.sim_devices)
            options._sim[stage] = (device, SimModel(path))
        device, model = options._sim[stage]
        return open_runtime(path, sim_device=device, sim_model=model)
    return open_runtime(path, options=width, budget=options.budget, stage=stage)


def describe_runtime(options: StageOptions) -> dict[str, Any]:
    """What this process's stages run on: onnxruntime, or the simulated accelerator with
    each opened DNN's profile."""
    if not options.simulated:
        return {"kind": "onnxruntime", "simulated": False}
    return {
        "kind": "simulated",
        "simulated": True,
        "devices": options.sim_devices,
        "profiles": {dnn: dev.profile.describe() for dnn, (dev, _) in options._sim.items()},
    }


def waited_for_cores(options: StageOptions) -> float:
    """Seconds this thread's DNN calls waited for a core since it last asked."""
    return options.budget.pop_waited() if options.budget is not None else 0.0
