"""The command line as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import os
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


def test_demo_runs_end_to_end(model_cache, data_dir, tmp_path):
    out = tmp_path / "demo"
    r = cvserve(
        "demo", "--model", "tiny-resnet", "--concurrency", "1,4", "--duration", "1",
        "--images", str(data_dir / "images" / "small"), "--cache-dir", str(model_cache),
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny-resnet has RANDOM weights" in r.stderr.splitlines()[0]
    for word in ("c=1", "c=4", "decode", "infer", "batch_wait", "end to end"):
        assert word in r.stdout, word
    # it explains: findings, a report with the bench's plots, and what to try next
    assert "a request took" in r.stdout and f"report: {out / 'report.html'}" in r.stdout
    for name in ("report.html", "demo.json", "throughput_latency_closed.png", "breakdown.png"):
        assert (out / name).is_file(), name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "What to try next" in page
    assert "cvserve demo --model tiny-resnet" in page  # how to reproduce it
    nxt = r.stdout.split("\nnext:\n", 1)[1]
    assert "cvserve serve --model tiny-resnet" in nxt and "cvserve study --quick" in nxt
    tail = r.stdout.split("\nreport:", 1)[1].splitlines()
    # within 80 columns, but for a line that names this test's (long) temporary folder
    assert all(len(line) <= 80 for line in tail if str(tmp_path) not in line), tail


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


# --- issue 24: the first hour's rough edges ------------------------------------------


def _every_parser():
    import argparse

    from cvserve.cli import build_parser
    from cvserve.cli._common import walk_parsers

    return [(p.prog, p) for _, p in walk_parsers(build_parser())], argparse


def test_every_help_shows_every_default_and_fits_80_columns():
    parsers, argparse = _every_parser()
    assert len(parsers) >= 15  # every command and subcommand
    for prog, p in parsers:
        text = p.format_help()  # conftest: COLUMNS=80
        too_long = [line for line in text.splitlines() if len(line) > 80]
        assert not too_long, (prog, too_long)
        formatter = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS:
                continue
            assert a.help, (prog, a.option_strings)  # every option says what it does
            shown = formatter._get_help_string(a) % {"default": a.default, "prog": prog}
            if a.default not in (None, False, "", [], argparse.SUPPRESS):
                assert "default" in shown, (prog, a.option_strings, shown)
            d = a.default
            if isinstance(d, int | float) and not isinstance(d, bool) and d != 0:
                # the value itself (0 means "chosen at start": the help says how), not only the word (e.g. "default request deadline")
                values = {f"{d:g}", str(d), f"{d:,}", f"{d:_}"}
                if isinstance(d, int) and d >= 2**20 and d % 2**20 == 0:
                    values.add(f"{d // 2**20}MiB")
                assert any(v in shown for v in values), (prog, a.option_strings, shown)


def _option_help(text: str) -> dict[str, str]:
    """``--help`` text to {flag: its whole help}, lines joined."""
    out: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            flag = stripped.split()[0].rstrip(",")
            if flag == "-v":
                flag = "--verbose"
            out[flag] = stripped
        elif flag and line.startswith("    ") and stripped:
            out[flag] += " " + stripped
        else:
            flag = None
    return out


def test_the_defaults_the_issue_named_are_in_help():
    for cmd, flags in {
        "serve": ["--max-batch-size", "--max-delay-ms", "--max-queue", "--timeout-ms",
                  "--max-body-bytes", "--max-pixels", "--port"],
        "bench": ["--url", "--duration", "--warmup-ms", "--timeout-ms"],
    }.items():  # fmt: skip
        helps = _option_help(cvserve(cmd, "--help").stdout)
        for flag in flags:
            assert "default" in helps[flag], (cmd, flag, helps[flag])
    assert "(default: 8)" in _option_help(cvserve("serve", "--help").stdout)["--max-batch-size"]


def test_a_typod_flag_gets_the_subcommands_usage_and_a_suggestion():
    r = cvserve("serve", "--max-bach-size", "4")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: cvserve serve")
    assert "did you mean --max-batch-size?" in r.stderr
    r = cvserve("models", "add", "m.onnx", "--forse")
    assert r.stderr.startswith("usage: cvserve models add") and "did you mean --force?" in r.stderr


def test_v_works_after_the_subcommand_too(tmp_path):
    r = cvserve("models", "show", "nope", "--cache-dir", str(tmp_path), "-v")
    assert r.returncode != 0 and "Traceback" in r.stderr  # -v: the traceback
    r = cvserve("-v", "models", "show", "nope", "--cache-dir", str(tmp_path))
    assert "Traceback" in r.stderr


def test_a_port_out_of_range_is_refused():
    for flag in ("--port", "--grpc-port", "--metrics-port"):
        r = cvserve("serve", "--model", "x", flag, "99999")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert f"argument {flag}: 99999 is not a port (1-65535, or 0 for any free port)" in r.stderr


def test_old_names_warn_and_mean_the_same(capsys):
    from cvserve.cli import build_parser
    from cvserve.config import server_config_from_args

    parser = build_parser()
    old = parser.parse_args(["serve", "--model", "m", "--max-batch", "4", "--max-body-mb", "2"])
    new = parser.parse_args(["serve", "--model", "m", "--max-batch-size", "4",
                             "--max-body-bytes", "2MiB"])  # fmt: skip
    a, b = server_config_from_args(old), server_config_from_args(new)
    assert a == b and a.models[0].batching.max_batch_size == 4 and a.max_body_bytes == 2 * 2**20
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: --max-batch is deprecated: use --max-batch-size 4",
        "warning: --max-body-mb is deprecated: use --max-body-bytes 2097152",
    ]
    args = parser.parse_args(["bench", "--model", "m", "--images", "x", "--warmup", "0.5"])
    assert args.warmup_ms == 500
    args = parser.parse_args(["profile", "m", "--warmup", "3"])
    assert args.warmup_runs == 3
    args = parser.parse_args(["models", "add", "m.onnx", "--overwrite"])
    assert args.force is True
    assert "--overwrite is deprecated: use --force" in capsys.readouterr().err
    worker = parser.parse_args(["worker", "--pipeline", "p", "--stage", "s", "--broker",
                                "redis://h:1", "--max-batch", "3"])  # fmt: skip
    assert worker.max_batch_size == 3


def test_add_says_force_when_the_name_is_taken(tmp_path, model_cache):
    from cvserve.models import store

    onnx = store.model_path(store.load_meta("tiny-resnet", model_cache), model_cache)
    args = ("models", "add", str(onnx), "--name", "mine", "--size", "32", "--resize", "0",
            "--cache-dir", str(tmp_path))  # fmt: skip
    assert cvserve(*args).returncode == 0
    r = cvserve(*args)
    assert r.returncode == 2 and "replace it with --force" in r.stderr
    assert cvserve(*args, "--force").returncode == 0


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    """serve --pipeline ocr and worker without the ocr extra: no traceback, the extra."""
    fake = tmp_path / "no-cv2" / "cv2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'cv2'\", name='cv2')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), *sys.path])}
    for args in (
        ["serve", "--pipeline", "ocr", "--port", "0", "--cache-dir", str(tmp_path)],
        ["worker", "--pipeline", "ocr", "--stage", "rec", "--broker", "redis://127.0.0.1:1"],
    ):
        r = subprocess.run([sys.executable, "-m", "cvserve", *args], capture_output=True,
                           text=True, timeout=240, env=env)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert r.stderr.splitlines()[-1] == (
            "error: this needs the ocr extra (no module named 'cv2'): pip install 'cvserve[ocr]'"
        )


def test_bench_reads_the_key_file_as_the_server_does_and_fails_when_all_fail(
    model_cache, data_dir, tmp_path
):
    from cvserve.config import ModelConfig, ServerConfig
    from cvserve.serving.process import ServerThread, free_port

    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-01\n\nthe-key\n")
    keys.chmod(0o600)
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-key\n")
    wrong.chmod(0o600)
    srv = ServerThread(ServerConfig(port=free_port(), cache_dir=str(model_cache),
                                    preprocess_threads=1, api_key_file=str(keys),
                                    models=(ModelConfig("tiny-resnet"),))).start()  # fmt: skip
    try:
        base = ("bench", "--url", srv.url, "--model", "tiny-resnet", "--images",
                str(data_dir / "images" / "small" / "dog.jpg"), "--requests", "6",
                "--warmup-ms", "0")  # fmt: skip
        ok = cvserve(*base, "--api-key-file", str(keys))
        denied = cvserve(*base, "--api-key-file", str(wrong))
    finally:
        srv.stop()
    assert ok.returncode == 0, ok.stderr
    assert denied.returncode == 1
    assert "error: every one of 6 requests failed (403 x6)" in denied.stderr
