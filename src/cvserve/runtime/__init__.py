"""Inference engines behind one small protocol: ``inputs``, ``outputs``, ``run(batch)``."""

from cvserve.runtime.onnx import OrtOptions, OrtRuntime, Runtime, RuntimeInputError

__all__ = ["OrtOptions", "OrtRuntime", "Runtime", "RuntimeInputError"]
