"""Inference engines behind one small protocol: ``inputs``, ``outputs``, ``run(batch)``:
onnxruntime (CPU, NVIDIA GPU, under a CPU budget), and a simulated accelerator that takes a
latency profile's time. :func:`open_runtimes` makes any of them."""

from cvserve.runtime.factory import open_runtime, open_runtimes
from cvserve.runtime.onnx import OrtOptions, OrtRuntime, Runtime, RuntimeInputError
from cvserve.runtime.sim_profile import SimProfile, packaged_profiles
from cvserve.runtime.simulated import SimDevice, SimModel, SimulatedRuntime

__all__ = [
    "OrtOptions",
    "OrtRuntime",
    "Runtime",
    "RuntimeInputError",
    "SimDevice",
    "SimModel",
    "SimProfile",
    "SimulatedRuntime",
    "open_runtime",
    "open_runtimes",
    "packaged_profiles",
]
