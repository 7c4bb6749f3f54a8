"""The command line as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import subprocess
import sys


def cvserve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cvserve", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_every_command():
    out = cvserve("--help").stdout
    for cmd in ("serve", "bench", "demo", "models", "report"):
        assert cmd in out


def test_models_list_and_show(model_cache):
    r = cvserve("models", "list", "--cache-dir", str(model_cache))
    assert r.returncode == 0
    for name in ("resnet50", "resnet18", "mobilenet-v2", "vit-base", "tiny-resnet"):
        assert name in r.stdout
    r = cvserve("models", "show", "tiny-resnet", "--cache-dir", str(model_cache))
    assert r.returncode == 0 and '"params"' in r.stdout and '"preprocess"' in r.stdout


def test_unknown_model_is_one_line_not_a_traceback(tmp_path):
    r = cvserve("models", "show", "nope", "--cache-dir", str(tmp_path))
    assert r.returncode == 2
    assert "unknown model 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_bad_serve_config_is_one_line(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  - name: tiny-resnet\n    max_batch_size: 0\n")
    r = cvserve("serve", "--config", str(cfg), "--cache-dir", str(tmp_path))
    assert r.returncode == 2
    assert "max_batch_size" in r.stderr and "Traceback" not in r.stderr


def test_a_yaml_float_where_an_integer_goes_is_one_line(tmp_path):
    """issue 20 #14: ``max_batch_size: 1.5`` passed validation and crashed at warm-up."""
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  - name: tiny-resnet\n    max_batch_size: 1.5\n")
    r = cvserve("serve", "--config", str(cfg), "--cache-dir", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "max_batch_size must be an integer >= 1, not 1.5 (float)" in r.stderr


def test_an_old_duration_flag_warns_in_one_line_naming_the_new_one(tmp_path):
    r = cvserve("serve", "--drain-delay", "5", "--cache-dir", str(tmp_path))
    assert r.returncode == 2  # parsed, then nothing to serve
    warning, error = r.stderr.splitlines()
    assert (
        warning
        == "warning: --drain-delay is deprecated (seconds): use --drain-delay-ms 5000 (milliseconds)"
    )
    assert error.startswith("error: nothing to serve")


def test_the_console_script_and_python_m_share_one_main():
    from importlib.metadata import entry_points

    from cvserve.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "cvserve"]
    assert script.value == "cvserve.cli:main"
    assert script.load() is main
    r = cvserve("--version")
    assert r.returncode == 0 and r.stdout.startswith("cvserve ")


def test_demo_runs_end_to_end(model_cache, data_dir):
    r = cvserve(
        "demo", "--model", "tiny-resnet", "--concurrency", "1,4", "--duration", "1",
        "--images", str(data_dir / "images" / "small"), "--cache-dir", str(model_cache),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    for word in ("c=1", "c=4", "decode", "infer", "batch_wait", "end to end"):
        assert word in r.stdout, word


def test_the_serving_path_never_imports_torch():
    code = (
        "import sys\n"
        "import cvserve.cli, cvserve.serving.server, cvserve.serving.pipelines.engine\n"
        "import cvserve.serving.pipelines.ocr, cvserve.serving.pipelines.steps\n"
        "import cvserve.tasks, cvserve.bench, cvserve.demo\n"
        "cvserve.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
