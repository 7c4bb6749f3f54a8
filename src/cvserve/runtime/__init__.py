"""Inference engines behind one small protocol: ``inputs``, ``outputs``, ``run(batch)``:
onnxruntime, and a simulated accelerator that takes a latency profile's time."""

from cvserve.runtime.onnx import OrtOptions, OrtRuntime, Runtime, RuntimeInputError
from cvserve.runtime.simulated import (
    SimDevice,
    SimModel,
    SimProfile,
    SimulatedRuntime,
    packaged_profiles,
)

__all__ = [
    "OrtOptions",
    "OrtRuntime",
    "Runtime",
    "RuntimeInputError",
    "SimDevice",
    "SimModel",
    "SimProfile",
    "SimulatedRuntime",
    "packaged_profiles",
]
