"""One factory for every runtime kind: onnxruntime on the CPU, onnxruntime on an NVIDIA
GPU, onnxruntime under a process-wide CPU budget, the simulated accelerator, or a
``torch.export`` program (``.pt2``) on the CPU or a GPU.

Callers say what they have (onnxruntime options, a simulated device, a CPU budget) and get
one runtime per model instance; instances of one model share what must be shared (the
simulated device and the model's output shapes, the GPU's device buffers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cvserve.runtime.onnx import OrtOptions, OrtRuntime, Runtime

if TYPE_CHECKING:
    from cvserve.runtime.budget import CpuBudget
    from cvserve.runtime.simulated import SimDevice, SimModel
    from cvserve.runtime.torchrt import TorchOptions

__all__ = ["open_runtime", "open_runtimes", "runtime_kind"]


def runtime_kind(
    options: OrtOptions | None = None,
    sim_device: SimDevice | None = None,
    budget: CpuBudget | None = None,
    torch_options: TorchOptions | None = None,
) -> str:
    """``simulated``, ``budgeted``, ``cuda``, ``torch`` or ``onnx``: which runtime the same
    arguments make in :func:`open_runtimes`."""
    if torch_options is not None:
        return "torch"
    if sim_device is not None:
        return "simulated"
    if budget is not None:
        return "budgeted"
    if options is not None and options.device != "cpu":
        return "cuda"
    return "onnx"


def open_runtimes(
    path: str | Path,
    instances: int = 1,
    *,
    options: OrtOptions | None = None,
    sim_device: SimDevice | None = None,
    sim_model: SimModel | None = None,
    budget: CpuBudget | None = None,
    stage: str = "",
    max_batch: int = 1,
    torch_options: TorchOptions | None = None,
    output_names: list[str] | None = None,
) -> list[Runtime]:
    """``instances`` runtimes of the model at ``path``.

    - ``sim_device``: simulated runtimes sharing that device and one ``sim_model`` (made
      here when not given);
    - ``budget``: onnxruntime sessions whose threads come from the CPU budget, named
      ``stage`` there (``options.intra_op_threads`` caps one call's width);
    - ``options.device`` other than ``cpu``: GPU sessions sharing the device twins of the
      batch buffers (``max_batch`` rows); fails with ``DeviceUnavailable``, never falls back
      to the CPU;
    - ``torch_options``: torch runtimes of the ``.pt2`` at ``path`` sharing one loaded
      program (and on a GPU its device buffers, ``max_batch`` rows), their outputs named
      ``output_names`` (the model's metadata) when given;
    - otherwise onnxruntime sessions on the CPU with ``options``.
    """
    kind = runtime_kind(options, sim_device, budget, torch_options)
    options = options or OrtOptions()
    if kind == "torch":
        from cvserve.runtime.torchrt import TorchRuntime

        first = None
        torch_runtimes: list[Runtime] = []
        for _ in range(instances):
            first = TorchRuntime(path, torch_options, shared=first, max_batch=max_batch,
                                 output_names=output_names)  # fmt: skip
            torch_runtimes.append(first)
        return torch_runtimes
    if kind == "simulated":
        from cvserve.runtime.simulated import SimModel, SimulatedRuntime

        model = sim_model or SimModel(path)
        return [SimulatedRuntime(path, sim_device, model=model) for _ in range(instances)]
    if kind == "budgeted":
        from cvserve.runtime.budget import BudgetedRuntime

        return [
            BudgetedRuntime(path, budget, stage, max_width=options.intra_op_threads)
            for _ in range(instances)
        ]
    if kind == "cuda":
        from cvserve.runtime.cuda import CudaRuntime

        runtimes: list[Runtime] = []
        buffers = None
        for _ in range(instances):
            rt = CudaRuntime(path, options, buffers, max_batch=max_batch)
            buffers = rt.buffers
            runtimes.append(rt)
        return runtimes
    return [OrtRuntime(path, options) for _ in range(instances)]


def open_runtime(path: str | Path, **kw) -> Runtime:  # noqa: ANN003
    """One runtime of the model at ``path``; the arguments of :func:`open_runtimes`."""
    return open_runtimes(path, 1, **kw)[0]
