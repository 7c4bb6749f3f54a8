"""The torch runtime on the CPU (torch's CPU build): a ``.pt2`` behind the runtime protocol,
dynamic and fixed batch sizes, channels-last, torch.compile, the config's checks, the
shared upload plan, and torch imported only when asked for. GPU-only parts are marked."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cvserve.config import ConfigError, ModelConfig
from cvserve.runtime import open_runtimes
from cvserve.runtime.device_rows import mark_row, upload_plan
from cvserve.runtime.factory import runtime_kind
from cvserve.runtime.providers import DeviceUnavailable
from cvserve.runtime.torchrt import TorchOptions, TorchRuntime, graph_buckets

torch = pytest.importorskip("torch", reason="the torch runtime needs the zoo extra here")


class Net(torch.nn.Module):
    """conv -> global mean -> linear, and a second output (the pooled features)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, pixel_values):
        f = torch.relu(self.conv(pixel_values)).mean(dim=(2, 3))
        return self.fc(f), f


def _save(path, dynamic: bool, batch: int = 2):
    from cvserve.models.pt2 import export_program, save_program

    net = Net().eval()
    x = torch.randn(batch, 3, 16, 16)
    if dynamic:
        ep, dyn = export_program(net, x)
        assert dyn
    else:
        ep = torch.export.export(net, (x,))
    save_program(ep, path)
    return net


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pt2")
    net = _save(d / "dyn.pt2", True)
    _save(d / "fixed4.pt2", False, batch=4)
    return d, net


def _eager(net, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in net(torch.from_numpy(x))]


@pytest.mark.parametrize("n", [1, 3, 8])
def test_a_dynamic_program_runs_every_batch_size_like_the_eager_model(programs, n):
    d, net = programs
    rt = TorchRuntime(d / "dyn.pt2", output_names=["logits", "features"])
    assert (rt.input_name, rt.input_shape, rt.input_dtype) == (
        "pixel_values",
        [None, 3, 16, 16],
        "float32",
    )
    assert rt.output_names == ["logits", "features"]
    assert rt.output_signature((3, 16, 16)) == [
        ("logits", "float32", (5,)),
        ("features", "float32", (8,)),
    ]
    x = np.random.default_rng(n).random((n, 3, 16, 16), dtype=np.float32)
    got = rt.run(x)
    for g, want in zip(got, _eager(net, x), strict=True):
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
    assert rt.last_stages is None  # the CPU: one call, all of it infer
    assert rt.describe()["batch"] == "dynamic" and rt.describe()["kind"] == "torch"


def test_a_fixed_batch_program_cuts_and_pads_the_batch(programs):
    d, net = programs
    rt = TorchRuntime(d / "fixed4.pt2")
    assert rt.input_shape[0] == 4 and rt.describe()["batch"] == 4
    x = np.random.default_rng(1).random((6, 3, 16, 16), dtype=np.float32)
    got = rt.run(x)
    assert got[0].shape == (6, 5)  # 4 + 2 (padded to 4, cut back)
    np.testing.assert_allclose(got[0], _eager(net, x)[0], rtol=1e-5, atol=1e-5)


def test_channels_last_and_compile_answer_the_same(programs):
    d, net = programs
    x = np.random.default_rng(2).random((2, 3, 16, 16), dtype=np.float32)
    want = _eager(net, x)[0]
    cl = TorchRuntime(d / "dyn.pt2", TorchOptions(channels_last=True))
    np.testing.assert_allclose(cl.run(x)[0], want, rtol=1e-4, atol=1e-5)
    if os.environ.get("CVSERVE_TEST_COMPILE", "1") == "1":  # Inductor needs a C++ compiler
        comp = TorchRuntime(d / "dyn.pt2", TorchOptions(compile=True))
        np.testing.assert_allclose(comp.run(x)[0], want, rtol=1e-4, atol=1e-4)


def test_instances_share_one_loaded_program(programs):
    d, _ = programs
    rts = open_runtimes(d / "dyn.pt2", 3, torch_options=TorchOptions())
    assert len(rts) == 3 and len({id(r.program) for r in rts}) == 1
    assert runtime_kind(torch_options=TorchOptions()) == "torch"


def test_bad_input_and_bad_files_get_one_line_errors(programs, tmp_path):
    from cvserve.runtime.onnx import RuntimeInputError

    d, _ = programs
    rt = TorchRuntime(d / "dyn.pt2")
    with pytest.raises(RuntimeInputError, match="shape"):
        rt.run(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(RuntimeInputError, match="dtype"):
        rt.run(np.zeros((1, 3, 16, 16), np.uint8))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch.export program"):
        TorchRuntime(junk)


def test_a_gpu_is_never_replaced_by_the_cpu(programs):
    d, _ = programs
    with pytest.raises(DeviceUnavailable, match="cuda:99"):
        TorchRuntime(d / "dyn.pt2", TorchOptions(device="cuda:99"))


def test_config_checks_torch_options_and_their_device():
    ModelConfig("m", runtime="torch", torch_compile=True, channels_last=True)
    ModelConfig("m", runtime="torch", device="cuda:1", precision="bf16", cuda_graphs=True)
    for kw, msg in (
        ({"runtime": "onnxruntime", "torch_compile": True}, "need.* --runtime torch"),
        ({"runtime": "torch", "precision": "fp16"}, "need --device cuda"),
        ({"runtime": "torch", "cuda_graphs": True}, "need --device cuda"),
        ({"runtime": "torch", "precision": "fp8", "device": "cuda"}, "precision 'fp8'"),
        ({"runtime": "torch", "device": "cuda", "fp16": True}, "use --precision fp16"),
        ({"runtime": "torch", "channels_last": "yes"}, "channels_last"),
    ):
        with pytest.raises(ConfigError, match=msg):
            ModelConfig("m", **kw)
    from cvserve.config import PipelineConfig

    with pytest.raises(ConfigError, match="serves models .* only"):
        PipelineConfig("ocr", runtime="torch")


def test_cli_flags_reach_the_config():
    from cvserve.cli import build_parser, server_config_from_args

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--runtime", "torch", "--device", "cuda", "--precision",
         "fp16", "--cuda-graphs", "--channels-last", "--torch-compile"]
    )  # fmt: skip
    mc = server_config_from_args(args).models[0]
    assert (mc.runtime, mc.precision, mc.cuda_graphs, mc.channels_last, mc.torch_compile) == (
        "torch", "fp16", True, True, True)  # fmt: skip


def test_the_upload_plan_copies_host_runs_and_moves_device_rows():
    magic = os.urandom(8)
    b = np.zeros((6, 3, 4, 4), np.float32)
    mark_row(b[1], 1, magic)  # written on the device in place
    mark_row(b[2], 4, magic)  # the batcher squeezed row 4 down to 2
    assert upload_plan(b, magic) == [("host", 0, 1), ("move", 2, 4), ("host", 3, 6)]
    assert upload_plan(np.zeros((2, 3, 4, 4), np.float32), magic) == [("host", 0, 2)]
    assert graph_buckets(12) == [1, 2, 4, 8, 12] and graph_buckets(1) == [1]


def test_serving_onnx_never_imports_torch(tmp_path):
    """The CPU install serves ONNX without torch: nothing on that path imports it."""
    code = (
        "import sys\n"
        "import cvserve.cli, cvserve.serving.server, cvserve.serving.model, cvserve.runtime\n"
        "import cvserve.models.pt2, cvserve.images.gpu_torch, cvserve.runtime.torchrt\n"
        "from cvserve.config import ModelConfig\n"
        "ModelConfig('m', runtime='torch', channels_last=True)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA torch")
@pytest.mark.parametrize(
    "opts", [{}, {"cuda_graphs": True}, {"precision": "fp16"}, {"channels_last": True}]
)
def test_on_a_gpu_the_program_answers_like_the_cpu_with_stages_timed(programs, opts):
    d, net = programs
    rt = TorchRuntime(d / "dyn.pt2", TorchOptions(device="cuda", **opts), max_batch=8)
    buf = np.random.default_rng(3).random((8, 3, 16, 16), dtype=np.float32)
    want = _eager(net, buf[:5])[0]
    got = rt.run(buf[:5])[0]
    tol = 2e-2 if opts.get("precision") else 1e-3
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert set(rt.last_stages) == {"h2d", "infer", "d2h"} and all(
        v >= 0 for v in rt.last_stages.values()
    )
    # a row already on the device (GPU preprocessing) is not copied, wherever it moved
    host = buf.copy()
    rt.buffers.for_host(host)[6].copy_(torch.from_numpy(buf[2]))
    mark_row(host[2], 6, rt.buffers.magic)
    np.testing.assert_allclose(rt.run(host[:5])[0], want, rtol=tol, atol=tol)


def test_torchs_openmp_threads_wait_passively_unless_told_otherwise():
    """Spinning OpenMP threads made resnet50 40x slower on a busy 2-core machine."""
    code = (
        "import os\n"
        "from cvserve.runtime.torchrt import import_torch\n"
        "import_torch()\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert out.strip() == "ACTIVE"
