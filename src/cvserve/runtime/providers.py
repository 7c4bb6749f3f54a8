"""Which onnxruntime execution providers a ``--device`` asks for, and why it cannot have them.

Pure functions over the list of providers onnxruntime says it has: the choice is tested
without a GPU. Asking for a GPU never falls back to the CPU silently: when no GPU provider
is there, :class:`DeviceUnavailable` says which package or library is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CPU",
    "CUDA",
    "TENSORRT",
    "Device",
    "DeviceUnavailable",
    "GPU_PROVIDERS",
    "check_session_providers",
    "installed_ort_packages",
    "missing_gpu_message",
    "parse_device",
    "select_providers",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
#: ``--gpu-provider`` values: TensorRT when present else CUDA, or one of them only.
PROVIDER_CHOICES = ("auto", "tensorrt", "cuda")

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class DeviceUnavailable(ValueError):
    """A GPU was asked for and onnxruntime cannot run on it here (says what is missing)."""


@dataclass(frozen=True)
class Device:
    """Where a model runs: ``cpu``, or ``cuda`` with a device index."""

    kind: str = "cpu"
    index: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(text: str | Device) -> Device:
    """``"cpu"``, ``"cuda"`` (device 0) or ``"cuda:N"``."""
    if isinstance(text, Device):
        return text
    m = _DEVICE.match(str(text).strip().lower())
    if not m:
        raise ValueError(f"device {text!r}: expected cpu, cuda or cuda:N (N a device index)")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" and index is not None:
        raise ValueError(f"device {text!r}: the CPU takes no index; say cpu")
    return Device(kind, int(index or 0))


def installed_ort_packages() -> list[str]:
    """The onnxruntime distributions installed (``onnxruntime``, ``onnxruntime-gpu`` ...)."""
    from importlib import metadata

    names = set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == "onnxruntime" or name.startswith("onnxruntime-"):
            names.add(name)
    return sorted(n for n in names if n in ("onnxruntime", "onnxruntime-gpu"))


def missing_gpu_message(
    device: Device, available: Sequence[str], packages: Sequence[str], want: str = "auto"
) -> str:
    """Why ``device`` cannot be had with these providers and packages, and what to do."""
    names = {"auto": "CUDA or TensorRT", "tensorrt": "TensorRT", "cuda": "CUDA"}[want]
    have = ", ".join(available) or "none"
    head = f"--device {device} asks for onnxruntime's {names} execution provider; this onnxruntime has {have}."
    if "onnxruntime-gpu" not in packages:
        return (
            f"{head} Install the GPU build: pip install 'cvserve[gpu]' (it brings "
            "onnxruntime-gpu with the CUDA and cuDNN libraries), then remove the CPU build "
            "that shadows it: pip uninstall -y onnxruntime && pip install --force-reinstall "
            "--no-deps onnxruntime-gpu"
        )
    if "onnxruntime" in packages:
        return (
            f"{head} Both onnxruntime and onnxruntime-gpu are installed and share one "
            "Python package, so the CPU build's files may have won: pip uninstall -y "
            "onnxruntime onnxruntime-gpu && pip install --no-deps onnxruntime-gpu"
        )
    if want == "tensorrt":
        return (
            f"{head} onnxruntime-gpu is installed, but its TensorRT provider is not "
            "listed: install TensorRT's libraries (pip install 'cvserve[gpu]' brings "
            "tensorrt-cu13-libs) or use --gpu-provider cuda"
        )
    return f"{head} onnxruntime-gpu is installed but lists no CUDA provider: reinstall it."


def select_providers(
    device: Device | str,
    available: Iterable[str],
    *,
    want: str = "auto",
    fp16: bool = False,
    trt_cache: str | Path | None = None,
    packages: Sequence[str] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(provider, options)`` list to open a session with, in priority order.

    ``cpu``: the CPU provider only. ``cuda:N``: TensorRT (engine cache in ``trt_cache``,
    FP16 kernels when ``fp16``) when ``want`` allows it and onnxruntime has it, then CUDA,
    then the CPU for the few operators neither takes (onnxruntime places those itself; the
    session is still a GPU session). No GPU provider: :class:`DeviceUnavailable`.
    """
    device = parse_device(device)
    if want not in PROVIDER_CHOICES:
        raise ValueError(f"gpu provider {want!r}: choose one of {', '.join(PROVIDER_CHOICES)}")
    available = list(available)
    if not device.is_gpu:
        return [(CPU, {})]
    idx = str(device.index)
    chosen: list[tuple[str, dict[str, Any]]] = []
    if want in ("auto", "tensorrt") and TENSORRT in available:
        trt: dict[str, Any] = {"device_id": idx, "trt_fp16_enable": "1" if fp16 else "0"}
        if trt_cache is not None:
            # Building an engine takes minutes for a large model: keep it (and the timing
            # cache) on disk so the next start loads it in seconds.
            trt.update(
                trt_engine_cache_enable="1",
                trt_engine_cache_path=str(trt_cache),
                trt_timing_cache_enable="1",
                trt_timing_cache_path=str(trt_cache),
            )
        chosen.append((TENSORRT, trt))
    if want in ("auto", "cuda") and CUDA in available:
        # TensorRT hands the operators it cannot take to CUDA, so CUDA always follows it.
        chosen.append((CUDA, {"device_id": idx}))
    elif want == "tensorrt" and chosen and CUDA in available:
        chosen.append((CUDA, {"device_id": idx}))
    if not chosen:
        pkgs = installed_ort_packages() if packages is None else list(packages)
        raise DeviceUnavailable(missing_gpu_message(device, available, pkgs, want))
    chosen.append((CPU, {}))
    return chosen


def check_session_providers(
    device: Device | str, asked: Sequence[tuple[str, Mapping[str, Any]]], got: Sequence[str]
) -> None:
    """onnxruntime drops a provider it cannot load (no cuDNN, a driver too old) with only a
    log line and runs on the CPU. A GPU session whose providers lost every GPU provider
    asked for is an error here, naming the libraries that provider loads."""
    device = parse_device(device)
    if not device.is_gpu:
        return
    wanted = [name for name, _ in asked if name in GPU_PROVIDERS]
    if any(name in got for name in wanted):
        return
    raise DeviceUnavailable(
        f"--device {device}: onnxruntime lists {', '.join(wanted)} but could not start it "
        f"(the session has only {', '.join(got) or 'no provider'}). It needs a working "
        "NVIDIA driver and GPU, and the CUDA runtime, cuBLAS, cuFFT and cuDNN 9 libraries "
        "(pip install 'cvserve[gpu]'; TensorRT also needs tensorrt-cu13-libs); "
        "onnxruntime's log above names the library it failed to load"
    )
