"""Configuration: the typed settings refuse what cannot work, saying what and why; a config
file's unknown keys, duplicate names and unreadable YAML are ConfigErrors."""

from __future__ import annotations

import re

import pytest

from cvserve.config import (
    DEFAULT_MAX_BODY_BYTES,
    BatchConfig,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
    load_config,
    model_config_from_dict,
    pipeline_config_from_dict,
    server_config_from_dict,
)
from cvserve.images.decode import DEFAULT_MAX_PIXELS

# --- BatchConfig ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_size", 0, "max_batch_size must be >= 1"),
        ("max_delay_ms", -0.5, "max_delay_ms must be >= 0"),
        ("instances", 0, "instances must be >= 1"),
        ("max_queue", 0, "max_queue must be >= 1"),
        ("timeout_ms", 0, "timeout_ms must be > 0"),
        ("timeout_ms", -1, "timeout_ms must be > 0"),
    ],
)
def test_batch_config_refuses(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        BatchConfig(**{field: value})


def test_batch_config_boundaries_are_allowed():
    b = BatchConfig(max_batch_size=1, max_delay_ms=0, instances=1, max_queue=1, timeout_ms=0.1)
    assert (b.max_batch_size, b.max_delay_ms, b.max_queue) == (1, 0, 1)
    d = BatchConfig()
    assert (d.max_batch_size, d.max_delay_ms, d.instances, d.max_queue, d.timeout_ms) == (
        8, 5.0, 1, 64, 30_000.0,
    )  # fmt: skip


# --- ModelConfig ------------------------------------------------------------------------


def test_model_config_defaults_and_store_name():
    m = ModelConfig("a")
    assert m.runtime == "onnxruntime" and m.decoder == "simplejpeg"
    assert m.batching == BatchConfig() and m.store_name == "a"
    assert ModelConfig("alias", model="resnet50").store_name == "resnet50"


def test_model_config_refuses_an_unknown_runtime():
    with pytest.raises(
        ConfigError,
        match=r"^model 'a': runtime 'tensorrt'; choose one of onnxruntime, simulated, torch$",
    ):
        ModelConfig("a", runtime="tensorrt")


def test_the_simulated_runtime_needs_a_profile():
    with pytest.raises(ConfigError, match=r"^model 'a': the simulated runtime needs a latency"):
        ModelConfig("a", runtime="simulated")
    with pytest.raises(ConfigError, match=r"^model 'a': the simulated runtime needs a latency"):
        ModelConfig("a", runtime="simulated", sim_profile="")


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("1:", r"profile entry '1:': expected BATCH:MS"),
        ("no-such-profile", r"cannot read profile 'no-such-profile': no such file"),
        ("/nowhere/p.json", r"cannot read profile '/nowhere/p.json'"),
    ],
)
def test_a_bad_profile_is_a_config_error_naming_the_model(profile, message):
    with pytest.raises(ConfigError, match=f"^model 'a': {message}"):
        ModelConfig("a", runtime="simulated", sim_profile=profile)


def test_simulated_models_accept_inline_and_packaged_profiles():
    inline = ModelConfig("a", runtime="simulated", sim_profile="1:0.9,8:2.4", sim_devices=2)
    assert inline.sim_devices == 2
    packaged = ModelConfig("b", runtime="simulated", sim_profile="resnet50-trt-a100",
                           sim_h2d_gbps=12.5)  # fmt: skip
    assert packaged.sim_h2d_gbps == 12.5


@pytest.mark.parametrize("extra", [{"sim_profile": "1:0.9"}, {"sim_h2d_gbps": 10.0}])
def test_simulator_settings_need_the_simulated_runtime(extra):
    with pytest.raises(
        ConfigError, match=r"^model 'a': sim_profile/sim_h2d_gbps need the simulated runtime"
    ):
        ModelConfig("a", **extra)


@pytest.mark.parametrize("devices", [0, -1, 1.5, "2"])
def test_sim_devices_must_be_a_positive_integer(devices):
    with pytest.raises(ConfigError, match=r"^model 'a': sim_devices must be an integer >= 1$"):
        ModelConfig("a", runtime="simulated", sim_profile="1:1", sim_devices=devices)


@pytest.mark.parametrize("gbps", [0.0, -3.0])
def test_sim_h2d_gbps_must_be_positive(gbps):
    with pytest.raises(ConfigError, match=r"^model 'a': sim_h2d_gbps must be > 0$"):
        ModelConfig("a", runtime="simulated", sim_profile="1:1", sim_h2d_gbps=gbps)


# --- PipelineConfig ---------------------------------------------------------------------


def test_pipeline_kind_defaults_to_its_name():
    assert PipelineConfig("ocr").kind == "ocr"
    assert PipelineConfig("dc", kind="detect-classify").kind == "detect-classify"


@pytest.mark.parametrize(
    "field", ["max_batch_size", "max_queue", "instances", "block_ms", "reclaim_idle_ms"]
)
def test_pipeline_config_counts_must_be_positive(field):
    with pytest.raises(ValueError, match=f"^{field} must be >= 1$"):
        PipelineConfig("ocr", **{field: 0})


def test_pipeline_config_workers_and_timeout():
    assert PipelineConfig("ocr", stage_workers=0).stage_workers == 0  # only external workers
    with pytest.raises(ValueError, match="^stage_workers must be >= 0$"):
        PipelineConfig("ocr", stage_workers=-1)
    with pytest.raises(ValueError, match="^timeout_ms must be > 0$"):
        PipelineConfig("ocr", timeout_ms=0)


def test_with_instances_changes_only_the_instances():
    p = PipelineConfig("dc", kind="detect-classify", stage_workers=2, params={"objects": 3})
    q = p.with_instances(4)
    assert q.instances == 4 and p.instances == 1
    assert (q.name, q.kind, q.stage_workers, q.params) == (
        "dc", "detect-classify", 2, {"objects": 3},
    )  # fmt: skip
    with pytest.raises(ValueError, match="^instances must be >= 1$"):
        p.with_instances(0)


# --- from a dict (a parsed config file) -------------------------------------------------


def test_a_full_config():
    cfg = server_config_from_dict(
        {
            "server": {"port": 9000, "max_pixels": 1000, "broker": "redis://h:6379"},
            "models": [
                {"name": "a", "max_batch_size": 4, "max_delay_ms": 2, "decoder": "pil"},
                {"name": "b", "model": "a", "runtime": "simulated", "sim_profile": "1:1,8:4",
                 "sim_devices": 2, "sim_h2d_gbps": 20, "instances": 3},
            ],
            "pipelines": [{"name": "ocr", "stage_workers": 0, "params": {"use_cls": False}}],
        }
    )  # fmt: skip
    assert (cfg.port, cfg.max_pixels, cfg.broker) == (9000, 1000, "redis://h:6379")
    assert cfg.host == "127.0.0.1" and cfg.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    a, b = cfg.models
    # batching keys sit flat in a model entry and land in its BatchConfig
    assert a.batching == BatchConfig(max_batch_size=4, max_delay_ms=2)
    assert a.decoder == "pil"
    assert b.store_name == "a" and b.batching.instances == 3
    assert (b.runtime, b.sim_profile, b.sim_devices, b.sim_h2d_gbps) == (
        "simulated",
        "1:1,8:4",
        2,
        20,
    )
    (p,) = cfg.pipelines
    assert (p.name, p.kind, p.stage_workers, p.params) == ("ocr", "ocr", 0, {"use_cls": False})


def test_pipelines_alone_are_enough():
    cfg = server_config_from_dict({"pipelines": [{"name": "ocr"}]})
    assert cfg.models == () and cfg.pipelines[0].name == "ocr"
    assert cfg.max_pixels == DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    "doc", [None, {}, {"models": [], "pipelines": []}, {"server": {"port": 1}, "models": None}]
)
def test_an_empty_config_serves_nothing(doc):
    with pytest.raises(ConfigError, match="^the config serves nothing: add a 'models' or"):
        server_config_from_dict(doc)


def test_unknown_top_level_keys():
    with pytest.raises(
        ConfigError, match=r"^unknown top-level keys \['model', 'zzz'\]; expected 'server', "
    ):
        server_config_from_dict({"model": [{"name": "a"}], "zzz": 1, "models": [{"name": "a"}]})


def test_unknown_server_keys():
    with pytest.raises(ConfigError, match=r"^server: unknown keys \['prot'\]; known: \[") as e:
        server_config_from_dict({"server": {"prot": 80}, "models": [{"name": "a"}]})
    assert "'port'" in str(e.value)
    # the lists are not server settings
    with pytest.raises(ConfigError, match=r"unknown keys \['models'\]"):
        server_config_from_dict({"server": {"models": []}, "models": [{"name": "a"}]})


def test_unknown_model_keys_name_the_model_and_the_known_keys():
    with pytest.raises(ConfigError, match=r"^model 'a': unknown keys \['batch', 'batching'\]") as e:
        server_config_from_dict({"models": [{"name": "a", "batch": 8, "batching": {}}]})
    known = str(e.value).split("known: ")[1]
    for key in ("max_batch_size", "timeout_ms", "runtime", "sim_profile", "decoder"):
        assert f"'{key}'" in known
    assert "'batching'" not in known  # nested form is not the file format


def test_unknown_pipeline_keys():
    with pytest.raises(ConfigError, match=r"^pipeline 'ocr': unknown keys \['max_delay_ms'\]"):
        server_config_from_dict({"pipelines": [{"name": "ocr", "max_delay_ms": 5}]})


@pytest.mark.parametrize("entry", [{}, {"model": "resnet50"}, "resnet50", None])
def test_an_entry_needs_a_name(entry):
    with pytest.raises(ConfigError, match="^a model entry needs at least a name"):
        model_config_from_dict(entry)
    with pytest.raises(ConfigError, match="^a pipeline entry needs at least a name"):
        pipeline_config_from_dict(entry)


def test_invalid_values_are_config_errors_naming_their_entry():
    with pytest.raises(ConfigError, match="^model 'a': max_batch_size must be >= 1$"):
        server_config_from_dict({"models": [{"name": "a", "max_batch_size": 0}]})
    with pytest.raises(ConfigError, match="^model 'a': "):  # a string where a number goes
        server_config_from_dict({"models": [{"name": "a", "max_queue": "64"}]})
    with pytest.raises(ConfigError, match="^pipeline 'ocr': stage_workers must be >= 0$"):
        server_config_from_dict({"pipelines": [{"name": "ocr", "stage_workers": -1}]})


def test_a_model_config_error_names_its_model_once(tmp_path):
    with pytest.raises(ConfigError, match="^model 'a': runtime 'trt'"):
        server_config_from_dict({"models": [{"name": "a", "runtime": "trt"}]})
    f = tmp_path / "sim.yaml"
    f.write_text("models:\n  - name: fast\n    runtime: simulated\n")
    with pytest.raises(ConfigError, match="^model 'fast': the simulated runtime needs"):
        load_config(f)


def test_duplicate_names():
    with pytest.raises(ConfigError, match=r"^model names must be unique: \['a', 'b', 'a'\]$"):
        server_config_from_dict({"models": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"^pipeline names must be unique: \['ocr', 'ocr'\]$"):
        server_config_from_dict({"pipelines": [{"name": "ocr"}, {"name": "ocr"}]})
    # one store model served under two names is fine
    cfg = server_config_from_dict({"models": [{"name": "a"}, {"name": "b", "model": "a"}]})
    assert [m.store_name for m in cfg.models] == ["a", "a"]


def test_a_model_and_a_pipeline_may_not_share_a_name():
    with pytest.raises(ConfigError):
        server_config_from_dict({"models": [{"name": "ocr"}], "pipelines": [{"name": "ocr"}]})


# --- files --------------------------------------------------------------------------------


def test_load_config_reads_yaml(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text(
        "server:\n  port: 8123\n  preprocess_threads: 3\n"
        "models:\n  - name: sim\n    model: tiny-resnet\n    runtime: simulated\n"
        "    sim_profile: '1:0.9,8:2.4'\n    sim_devices: 2\n    sim_h2d_gbps: 25.0\n"
        "    max_batch_size: 8\n"
        "pipelines:\n  - name: dc\n    kind: detect-classify\n    stage_workers: 0\n"
    )
    cfg = load_config(f)
    assert isinstance(cfg, ServerConfig)
    assert cfg.port == 8123 and cfg.resolved_preprocess_threads() == 3
    (m,) = cfg.models
    assert (m.name, m.store_name, m.runtime, m.sim_profile) == (
        "sim", "tiny-resnet", "simulated", "1:0.9,8:2.4",
    )  # fmt: skip
    assert (m.sim_devices, m.sim_h2d_gbps, m.batching.max_batch_size) == (2, 25.0, 8)
    assert cfg.pipelines[0].kind == "detect-classify" and cfg.pipelines[0].stage_workers == 0


def test_load_config_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^cannot read config {re.escape(str(missing))}: "):
        load_config(missing)
    with pytest.raises(ConfigError, match="^cannot read config "):
        load_config(tmp_path)  # a directory


def test_load_config_bad_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("models:\n  - name: a\n   max_batch_size: [8\n")
    with pytest.raises(ConfigError, match=f"^config {re.escape(str(f))} is not valid YAML: "):
        load_config(f)


def test_load_config_empty_file(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="^the config serves nothing"):
        load_config(f)


def test_load_config_simulated_profile_error_names_the_model(tmp_path):
    f = tmp_path / "sim.yaml"
    f.write_text("models:\n  - name: fast\n    runtime: simulated\n")
    with pytest.raises(ConfigError, match="model 'fast': the simulated runtime needs"):
        load_config(f)
    f.write_text("models:\n  - name: fast\n    runtime: simulated\n    sim_profile: '8:'\n")
    with pytest.raises(ConfigError, match="model 'fast': profile entry '8:'"):
        load_config(f)


@pytest.mark.parametrize(
    "text", ["- name: a\n", "just a string\n", "server: 5\nmodels: [{name: a}]\n"]
)
def test_load_config_a_document_that_is_not_a_mapping(tmp_path, text):
    f = tmp_path / "odd.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError):
        load_config(f)


def test_a_config_files_host_and_port_hold_unless_flags_are_given(tmp_path):
    from cvserve.cli import build_parser, server_config_from_args

    path = tmp_path / "serve.yaml"
    path.write_text("server: {host: 0.0.0.0, port: 9123}\nmodels:\n  - {name: resnet18}\n")

    def cfg(*flags):
        return server_config_from_args(
            build_parser().parse_args(["serve", "--config", str(path), *flags])
        )

    assert (cfg().host, cfg().port) == ("0.0.0.0", 9123)
    assert (cfg("--port", "9000").host, cfg("--port", "9000").port) == ("0.0.0.0", 9000)
    assert cfg("--host", "127.0.0.2").host == "127.0.0.2"
    plain = server_config_from_args(build_parser().parse_args(["serve", "--model", "m"]))
    assert (plain.host, plain.port) == ("127.0.0.1", 8000)


# --- strict types (issue 20 #14) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"max_batch_size": 1.5}, "max_batch_size must be an integer >= 1, not 1.5 (float)"),
        ({"max_batch_size": 2.0}, "max_batch_size must be an integer >= 1, not 2.0 (float)"),
        ({"max_batch_size": True}, "max_batch_size must be an integer >= 1, not True (bool)"),
        ({"instances": "2"}, "instances must be an integer >= 1, not '2' (str)"),
        ({"max_queue": 8.5}, "max_queue must be an integer >= 1, not 8.5 (float)"),
        ({"intra_op_threads": 1.5}, "intra_op_threads must be an integer >= 0, not 1.5"),
        ({"timeout_ms": float("nan")},
         "timeout_ms must be a finite number of milliseconds > 0, not nan (float)"),
        ({"timeout_ms": float("inf")},
         "timeout_ms must be a finite number of milliseconds > 0, not inf (float)"),
        ({"timeout_ms": True},
         "timeout_ms must be a finite number of milliseconds > 0, not True (bool)"),
        ({"timeout_ms": "30s"},
         "timeout_ms must be a finite number of milliseconds > 0, not '30s' (str)"),
        ({"max_delay_ms": float("nan")},
         "max_delay_ms must be a finite number of milliseconds >= 0, not nan (float)"),
        ({"max_queue_wait_ms": float("nan")},
         "max_queue_wait_ms must be 'auto' or a number >= 0, not nan"),
        ({"fp16": "yes"}, "fp16 must be true or false, not 'yes' (str)"),
        ({"runtime": "simulated", "sim_profile": "1:1", "sim_h2d_gbps": float("nan")},
         "sim_h2d_gbps must be a finite number of GB/s > 0, not nan (float)"),
    ],
)  # fmt: skip
def test_a_model_entry_of_the_wrong_type_names_the_key_the_value_and_what_is_allowed(
    entry, message
):
    with pytest.raises(ConfigError) as e:
        model_config_from_dict({"name": "a", **entry})
    assert str(e.value).startswith(f"model 'a': {message}")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"max_batch_size": 1.5}, "max_batch_size must be an integer >= 1, not 1.5 (float)"),
        ({"block_ms": 50.5}, "block_ms must be an integer >= 1, not 50.5 (float)"),
        ({"reclaim_idle_ms": True}, "reclaim_idle_ms must be an integer >= 1, not True (bool)"),
        ({"stage_workers": 1.5}, "stage_workers must be an integer >= 0, not 1.5 (float)"),
        ({"cores": 0.5}, "cores must be an integer >= 0, or -1 for no CPU budget, not 0.5"),
        ({"timeout_ms": float("nan")},
         "timeout_ms must be a finite number of milliseconds > 0, not nan (float)"),
        ({"params": [1]}, "params must be a mapping, not [1]"),
    ],
)  # fmt: skip
def test_a_pipeline_entry_of_the_wrong_type_is_refused(entry, message):
    with pytest.raises(ConfigError) as e:
        pipeline_config_from_dict({"name": "ocr", **entry})
    assert str(e.value).startswith(f"pipeline 'ocr': {message}")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"port": "8000"}, "port must be an integer port, not '8000'"),
        ({"port": 70000}, "port 70000 is not a port (0-65535)"),
        ({"max_pixels": 1.5e6}, "max_pixels must be an integer >= 1, not 1500000.0 (float)"),
        ({"preprocess_threads": 2.5}, "preprocess_threads must be an integer >= 0, not 2.5"),
        ({"max_body_bytes": True}, "max_body_bytes must be an integer >= 1, not True (bool)"),
        ({"reuse_port": 1}, "reuse_port must be true or false, not 1 (int)"),
        ({"drain_delay_ms": float("nan")},
         "drain_delay_ms must be a finite number of milliseconds >= 0, not nan (float)"),
        ({"drain_timeout_ms": -1}, "drain_timeout_ms must be >= 0"),
    ],
)  # fmt: skip
def test_server_settings_of_the_wrong_type_are_refused(server, message):
    with pytest.raises(ConfigError) as e:
        server_config_from_dict({"server": server, "models": [{"name": "a"}]})
    assert str(e.value).startswith(f"server: {message}")


def test_yaml_floats_where_integers_go_and_nan_durations_fail_at_load(tmp_path):
    """The reported cases: ``max_batch_size: 1.5`` passed and crashed at warm-up with a
    TypeError; ``timeout_ms: .nan`` was accepted."""
    f = tmp_path / "serve.yaml"
    f.write_text("models:\n  - name: a\n    max_batch_size: 1.5\n")
    with pytest.raises(ConfigError, match=r"^model 'a': max_batch_size must be an integer"):
        load_config(f)
    for value in (".nan", ".inf", "-.inf"):
        f.write_text(f"models:\n  - name: a\n    timeout_ms: {value}\n")
        with pytest.raises(ConfigError, match=r"^model 'a': timeout_ms must be a finite number"):
            load_config(f)
    f.write_text("pipelines:\n  - name: ocr\n    timeout_ms: .nan\n")
    with pytest.raises(ConfigError, match=r"^pipeline 'ocr': timeout_ms must be a finite"):
        load_config(f)


def test_numbers_of_either_kind_are_durations(tmp_path):
    f = tmp_path / "serve.yaml"
    f.write_text(
        "server: {drain_delay_ms: 250, drain_timeout_ms: 1500.5}\n"
        "models:\n  - {name: a, timeout_ms: 100, max_delay_ms: 2.5, max_queue_wait_ms: 0}\n"
    )
    cfg = load_config(f)
    assert (cfg.drain_delay_ms, cfg.drain_timeout_ms) == (250, 1500.5)
    assert (cfg.drain_delay_s, cfg.drain_timeout_s) == (0.25, 1.5005)
    b = cfg.models[0].batching
    assert (b.timeout_ms, b.max_delay_ms, b.max_queue_wait_ms) == (100, 2.5, 0.0)


# --- one unit for durations: the old spellings in seconds still work, with a warning ------


def test_old_server_duration_keys_are_read_as_seconds_with_a_warning(caplog):
    doc = {"server": {"drain_delay_s": 2, "drain_timeout_s": 0.5}, "models": [{"name": "a"}]}
    with caplog.at_level("WARNING", logger="cvserve.config"):
        cfg = server_config_from_dict(doc)
    assert (cfg.drain_delay_ms, cfg.drain_timeout_ms) == (2000, 500)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "server: drain_delay_s is deprecated (seconds): use drain_delay_ms: 2000 (milliseconds)",
        "server: drain_timeout_s is deprecated (seconds): use drain_timeout_ms: 500 (milliseconds)",
    ]


def test_new_duration_keys_do_not_warn_and_both_spellings_are_refused(caplog):
    with caplog.at_level("WARNING", logger="cvserve.config"):
        cfg = server_config_from_dict({"server": {"drain_delay_ms": 5}, "models": [{"name": "a"}]})
    assert cfg.drain_delay_ms == 5 and not caplog.records
    with pytest.raises(ConfigError, match="drain_delay_s and drain_delay_ms are the same setting"):
        server_config_from_dict(
            {"server": {"drain_delay_s": 1, "drain_delay_ms": 5}, "models": [{"name": "a"}]}
        )
    with pytest.raises(ConfigError, match=r"^server: drain_delay_ms must be a finite number"):
        server_config_from_dict({"server": {"drain_delay_s": "1"}, "models": [{"name": "a"}]})


def test_a_config_written_for_workers_reads_back_without_warnings(caplog):
    from cvserve.config import config_to_dict

    cfg = server_config_from_dict({"server": {"drain_delay_s": 1.5}, "models": [{"name": "a"}]})
    caplog.clear()
    with caplog.at_level("WARNING", logger="cvserve.config"):
        assert server_config_from_dict(config_to_dict(cfg)) == cfg
    assert not caplog.records


@pytest.mark.parametrize(
    ("old", "new", "dest"),
    [
        ("--drain-delay", "--drain-delay-ms", "drain_delay_ms"),
        ("--drain-timeout", "--drain-timeout-ms", "drain_timeout_ms"),
    ],
)
def test_old_serve_duration_flags_are_seconds_with_a_one_line_warning(old, new, dest, capsys):
    from cvserve.cli import build_parser, server_config_from_args

    args = build_parser().parse_args(["serve", "--model", "m", old, "2.5"])
    err = capsys.readouterr().err
    assert err == f"warning: {old} is deprecated (seconds): use {new} 2500 (milliseconds)\n"
    assert getattr(server_config_from_args(args), dest) == 2500
    args = build_parser().parse_args(["serve", "--model", "m", new, "2500"])
    assert capsys.readouterr().err == ""
    assert getattr(server_config_from_args(args), dest) == 2500


def test_bench_timeouts_are_milliseconds_and_the_old_seconds_still_parse(capsys):
    from cvserve.cli import build_parser

    def bench(*flags):
        return build_parser().parse_args(["bench", "--model", "m", "--images", "x", *flags])

    d = bench()
    assert (d.timeout_ms, d.ready_timeout_ms) == (30_000, 0)
    assert capsys.readouterr().err == ""
    new = bench("--timeout-ms", "1500", "--ready-timeout-ms", "20000")
    assert (new.timeout_ms, new.ready_timeout_ms) == (1500, 20_000)
    old = bench("--timeout", "1.5", "--ready-timeout", "20")
    assert (old.timeout_ms, old.ready_timeout_ms) == (1500, 20_000)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: --timeout is deprecated (seconds): use --timeout-ms 1500 (milliseconds)",
        "warning: --ready-timeout is deprecated (seconds): use --ready-timeout-ms 20000 "
        "(milliseconds)",
    ]


def test_the_presets_open_the_dnns_their_profiles_name():
    """A per-DNN simulated profile names the DNNs the preset's steps open (their ``dnn``)."""
    from cvserve.config import PIPELINE_KINDS, PipelineConfig
    from cvserve.serving.pipelines import KINDS

    assert set(KINDS) == set(PIPELINE_KINDS) - {"graph"}
    want = {"ocr": {"det", "cls", "rec"}, "detect-classify": {"det", "cls"},
            "detect-embed": {"det", "emb"}}  # fmt: skip
    for kind in KINDS:
        params = {"embedder": "mine"} if kind == "detect-embed" else {}
        assert PipelineConfig(kind, params=params).dnns() == want[kind]
    assert PipelineConfig("faces", kind="detect-embed").graph_steps[2].target == "dinov2-small"


def test_worker_flags_map_to_the_stages_pipeline_config():
    from cvserve.cli import build_parser
    from cvserve.config import worker_config_from_args

    argv = ["worker", "--pipeline", "dc", "--kind", "detect-classify", "--stage", "classify",
            "--broker", "redis://h:6379", "--max-batch-size", "4", "--reclaim-idle-ms", "900",
            "--param", "classifier=resnet18", "--param", "objects=3",
            "--runtime", "simulated", "--sim-profile", "1:2"]  # fmt: skip
    cfg = worker_config_from_args(build_parser().parse_args(argv))
    assert (cfg.name, cfg.kind, cfg.max_batch_size, cfg.reclaim_idle_ms) == (
        "dc", "detect-classify", 4, 900,
    )  # fmt: skip
    assert cfg.params == {"classifier": "resnet18", "objects": 3}
    assert cfg.graph_steps[0].params["top_k"] == 3  # the preset's steps take the params
    with pytest.raises(ValueError, match="unknown params \\['score'\\] of preset"):
        worker_config_from_args(build_parser().parse_args([*argv, "--param", "score=0.5"]))
    assert (cfg.runtime, cfg.sim_profile) == ("simulated", "1:2")
    with pytest.raises(ValueError, match="expected KEY=VALUE, got 'oops'"):
        worker_config_from_args(build_parser().parse_args([*argv, "--param", "oops"]))
