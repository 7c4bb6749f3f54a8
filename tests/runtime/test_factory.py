"""``runtime.open_runtimes``: one factory for every runtime kind."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cvserve.runtime import (
    OrtOptions,
    OrtRuntime,
    SimDevice,
    SimulatedRuntime,
    open_runtime,
    open_runtimes,
)
from cvserve.runtime.budget import BudgetedRuntime, CpuBudget
from cvserve.runtime.factory import runtime_kind
from cvserve.runtime.providers import DeviceUnavailable


@pytest.fixture(scope="module")
def affine_onnx(tmp_path_factory):
    """y = 2 * x + 1 over a [N, 3] float input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "affine", [x], [y], [two, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("affine") / "affine.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_cpu_sessions_by_default_with_the_options_given(affine_onnx):
    rts = open_runtimes(affine_onnx, 2, options=OrtOptions(intra_op_threads=1))
    assert len(rts) == 2 and all(type(rt) is OrtRuntime for rt in rts)
    assert rts[0] is not rts[1]  # a session per instance
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(rts[1].run(x)[0], 2 * x.astype(np.float64) + 1)
    assert type(open_runtime(affine_onnx)) is OrtRuntime


def test_simulated_instances_share_the_device_and_the_model(affine_onnx):
    device = SimDevice("1:2, 8:4")
    rts = open_runtimes(affine_onnx, 3, sim_device=device)
    assert all(isinstance(rt, SimulatedRuntime) for rt in rts)
    assert {id(rt.device) for rt in rts} == {id(device)}
    assert len({id(rt.model) for rt in rts}) == 1
    out = rts[0].run(np.zeros((2, 3), np.float32))
    assert out[0].shape == (2, 3) and out[0].dtype == np.float32


def test_budgeted_sessions_answer_like_plain_ones(affine_onnx):
    rt = open_runtime(affine_onnx, budget=CpuBudget(1), stage="det")
    assert isinstance(rt, BudgetedRuntime)
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(rt.run(x)[0], np.full((4, 3), 3.0, np.float32))


def test_the_kind_follows_the_arguments():
    assert runtime_kind() == "onnx"
    assert runtime_kind(OrtOptions(device="cuda:0")) == "cuda"
    assert runtime_kind(OrtOptions(), budget=CpuBudget(1)) == "budgeted"
    assert runtime_kind(OrtOptions(device="cuda"), sim_device=SimDevice("1:1")) == "simulated"


def test_a_gpu_kind_never_falls_back_to_the_cpu(affine_onnx):
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceUnavailable):
            open_runtimes(affine_onnx, 1, options=OrtOptions(device="cuda:0"))
    else:
        pytest.skip("a GPU stack is installed: tests/runtime/test_cuda.py covers it")
