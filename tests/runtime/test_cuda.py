"""The GPU runtime: device parsing, provider choice, the clear errors, and (on a GPU only)
IO binding against the CPU session's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cvserve.cli import build_parser, main, server_config_from_args
from cvserve.config import ConfigError, ModelConfig, load_config
from cvserve.runtime.device_rows import mark_row
from cvserve.runtime.onnx import OrtOptions, OrtRuntime
from cvserve.runtime.providers import (
    CPU,
    CUDA,
    TENSORRT,
    Device,
    DeviceUnavailable,
    check_session_providers,
    parse_device,
    select_providers,
)
from cvserve.serving.model import _make_runtimes

HAS_GPU_ORT = CUDA in ort.get_available_providers()


def _has_cuda_device() -> bool:
    try:
        import cupy

        return HAS_GPU_ORT and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


pytestmark = pytest.mark.gpu  # the GPU path: its tests may skip where there is none

needs_gpu = pytest.mark.skipif(
    not _has_cuda_device(),
    reason="needs an NVIDIA GPU with onnxruntime-gpu and CuPy (pip install 'cvserve[gpu]')",
)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """y = 2 * x + 1 over a [N, 3, 4, 4] float input, and its row sums: two outputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 1])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["s4"], keepdims=0),
        helper.make_node("Unsqueeze", ["s4", "one_axis"], ["s"]),
    ]
    one_axis = helper.make_tensor("one_axis", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(nodes, "tiny", [x], [y, s], [two, one, axes, one_axis])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(model, str(path))
    return str(path)


# --- devices and providers -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [("cpu", Device("cpu", 0)), ("cuda", Device("cuda", 0)), ("CUDA:3", Device("cuda", 3))],
)
def test_parse_device(text, want):
    assert parse_device(text) == want
    assert str(parse_device(text)) == ("cpu" if want.kind == "cpu" else f"cuda:{want.index}")


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cpu:0", "cuda:1:2", ""])
def test_parse_device_rejects_what_it_cannot_mean(bad):
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N|takes no index"):
        parse_device(bad)


def test_cpu_gets_the_cpu_provider_whatever_is_installed():
    assert select_providers("cpu", [TENSORRT, CUDA, CPU]) == [(CPU, {})]


def test_tensorrt_first_then_cuda_then_cpu(tmp_path):
    chosen = select_providers("cuda:1", [TENSORRT, CUDA, CPU], fp16=True, trt_cache=tmp_path)
    assert [n for n, _ in chosen] == [TENSORRT, CUDA, CPU]
    trt = chosen[0][1]
    assert trt["device_id"] == "1" and chosen[1][1] == {"device_id": "1"}
    assert trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"] == str(tmp_path)
    # every option value is a string, as onnxruntime's provider_options require
    assert all(isinstance(v, str) for _, o in chosen for v in o.values())


def test_fp16_off_and_no_cache_unless_asked():
    trt = select_providers("cuda", [TENSORRT, CUDA, CPU])[0][1]
    assert trt["trt_fp16_enable"] == "0"
    assert "trt_engine_cache_enable" not in trt


def test_cuda_when_tensorrt_is_absent_or_not_wanted():
    assert [n for n, _ in select_providers("cuda", [CUDA, CPU])] == [CUDA, CPU]
    only_cuda = select_providers("cuda", [TENSORRT, CUDA, CPU], want="cuda")
    assert [n for n, _ in only_cuda] == [CUDA, CPU]


def test_no_gpu_provider_is_one_clear_error_naming_the_package():
    with pytest.raises(DeviceUnavailable) as e:
        select_providers("cuda", [CPU, "AzureExecutionProvider"], packages=["onnxruntime"])
    msg = str(e.value)
    assert "--device cuda:0" in msg and "onnxruntime-gpu" in msg and "cvserve[gpu]" in msg
    assert "CPUExecutionProvider" in msg  # what this onnxruntime does have


def test_both_builds_installed_is_named_as_the_cause():
    with pytest.raises(DeviceUnavailable, match="Both onnxruntime and onnxruntime-gpu"):
        select_providers("cuda", [CPU], packages=["onnxruntime", "onnxruntime-gpu"])


def test_tensorrt_only_without_tensorrt_names_tensorrt():
    with pytest.raises(DeviceUnavailable, match="TensorRT.*tensorrt-cu13-libs"):
        select_providers("cuda", [CUDA, CPU], want="tensorrt", packages=["onnxruntime-gpu"])


def test_a_session_that_lost_its_gpu_provider_is_an_error():
    asked = select_providers("cuda", [CUDA, CPU])
    check_session_providers("cuda", asked, [CUDA, CPU])  # fine
    with pytest.raises(DeviceUnavailable, match="could not start it.*cuDNN"):
        check_session_providers("cuda", asked, [CPU])
    check_session_providers("cpu", [(CPU, {})], [CPU])


# --- the errors a user sees at start-up -------------------------------------------------------
@pytest.mark.skipif(HAS_GPU_ORT, reason="this onnxruntime has the CUDA provider")
def test_asking_for_cuda_on_a_cpu_onnxruntime_fails_at_start(tiny_onnx):
    with pytest.raises(DeviceUnavailable, match="onnxruntime-gpu"):
        OrtRuntime(tiny_onnx, OrtOptions(device="cuda"))
    cfg = ModelConfig(name="tiny", device="cuda:0")
    with pytest.raises(DeviceUnavailable, match="--device cuda:0"):
        _make_runtimes(tiny_onnx, cfg)


def test_device_unavailable_is_a_one_line_cli_error():
    # main() prints ValueErrors as one line and exits 2; DeviceUnavailable is one
    assert issubclass(DeviceUnavailable, ValueError)


def test_cpu_sessions_are_unchanged(tiny_onnx):
    rt = OrtRuntime(tiny_onnx, OrtOptions(intra_op_threads=1))
    x = np.arange(2 * 48, dtype=np.float32).reshape(2, 3, 4, 4)
    y, s = rt.run(x)
    np.testing.assert_allclose(y, 2 * x.astype(np.float64) + 1, rtol=1e-6)
    np.testing.assert_allclose(s[:, 0], (2 * x.astype(np.float64) + 1).sum(axis=(1, 2, 3)))
    assert rt.providers == [CPU]


# --- options: CLI and YAML ---------------------------------------------------------------------
def test_cli_flags_reach_the_model_config():
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--device", "cuda:1", "--gpu-provider", "cuda", "--fp16",
         "--trt-cache", "/tmp/trt", "--preprocess", "auto"]
    )  # fmt: skip
    mc = server_config_from_args(args).models[0]
    assert (mc.device, mc.gpu_provider, mc.fp16, mc.trt_cache, mc.preprocess_device) == (
        "cuda:1", "cuda", True, "/tmp/trt", "auto",
    )  # fmt: skip
    plain = server_config_from_args(build_parser().parse_args(["serve", "--model", "m"]))
    assert (plain.models[0].device, plain.models[0].preprocess_device) == ("cpu", "cpu")


def test_yaml_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - name: r\n    device: cuda\n    fp16: true\n    preprocess_device: gpu\n"
    )
    mc = load_config(path).models[0]
    assert (mc.device, mc.fp16, mc.preprocess_device) == ("cuda", True, "gpu")


@pytest.mark.parametrize(
    "fields, says",
    [
        ({"device": "gpu"}, "expected cpu, cuda or cuda:N"),
        ({"preprocess_device": "gpu"}, "--preprocess gpu need"),
        ({"fp16": True}, "--fp16 need"),
        ({"device": "cuda", "gpu_provider": "tpu"}, "gpu_provider 'tpu'"),
        ({"device": "cuda", "preprocess_device": "fast"}, "preprocess 'fast'"),
        ({"device": "cuda", "runtime": "simulated", "sim_profile": "1:1"}, "its own device"),
    ],
)
def test_config_errors_say_what_is_wrong(fields, says):
    with pytest.raises(ConfigError, match=says):
        ModelConfig(name="m", **fields)


def test_cli_rejects_gpu_preprocessing_without_a_gpu(capsys):
    code = main(["serve", "--model", "m", "--preprocess", "gpu"])
    assert code == 2
    assert "--device cuda" in capsys.readouterr().err


# --- on a GPU ------------------------------------------------------------------------------------
@needs_gpu
def test_io_binding_matches_the_cpu_session_and_times_the_copies(tiny_onnx):
    from cvserve.runtime.cuda import CudaRuntime

    cpu = OrtRuntime(tiny_onnx, OrtOptions(intra_op_threads=1))
    gpu = CudaRuntime(tiny_onnx, OrtOptions(device="cuda", gpu_provider="cuda"), max_batch=4)
    buf = np.random.default_rng(0).random((4, 3, 4, 4), dtype=np.float32)
    for n in (1, 3, 4):
        got = gpu.run(buf[:n])
        want = cpu.run(buf[:n])
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        assert set(gpu.last_stages) == {"h2d", "infer", "d2h"}
    assert CUDA in gpu.providers


@needs_gpu
def test_rows_written_on_the_device_are_used_in_place_and_after_a_squeeze(tiny_onnx):
    from cvserve.runtime.cuda import CudaRuntime

    gpu = CudaRuntime(tiny_onnx, OrtOptions(device="cuda", gpu_provider="cuda"), max_batch=4)
    cpu = OrtRuntime(tiny_onnx, OrtOptions(intra_op_threads=1))
    buf = np.random.default_rng(1).random((4, 3, 4, 4), dtype=np.float32)
    want = buf.copy()
    dev = gpu.buffers.for_host(buf)
    dev[2].set(want[2])  # as GPU preprocessing would
    mark_row(buf[2], 2, gpu.buffers.magic)
    buf[1] = buf[2]  # the batcher squeezes row 1 out: row 2's host row moves up
    want[1] = want[2]
    got = gpu.run(buf[:3])
    np.testing.assert_allclose(got[0], cpu.run(want[:3])[0], rtol=1e-5)
