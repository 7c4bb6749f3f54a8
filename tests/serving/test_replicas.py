"""``serve --workers N``: real server processes on one port, real signals. Which process
answered a connection is read from ``/proc`` (the process that holds its socket), not
from anything the server says about itself."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from served import MODEL, PREDICT, SLOW, Served, wait_for

from cvserve.cli import build_parser, server_config_from_args
from cvserve.config import (
    BatchConfig,
    ConfigError,
    ModelConfig,
    PipelineConfig,
    ServerConfig,
    config_to_dict,
    load_config,
    server_config_from_dict,
)
from cvserve.serving.process import ServerProcess, free_port
from cvserve.serving.replicas import replica_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _socket_inodes(server_port: int, client_port: int) -> set[str]:
    """Inodes of the server side of the TCP connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cells = line.split()
            local, remote = int(cells[1].rsplit(":", 1)[1], 16), int(cells[2].rsplit(":", 1)[1], 16)
            if local == server_port and remote == client_port:
                inodes.add(cells[9])
    return inodes


def _owner(pids: set[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the server side of the connection from ``client_port``."""
    inodes = _socket_inodes(server_port, client_port)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            m = re.fullmatch(r"socket:\[(\d+)\]", link)
            if m and m.group(1) in inodes:
                return pid
    return None


def _requests_total(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cvserve_requests_total{")
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="module")
def jpg(data_dir) -> bytes:
    return (data_dir / "images" / "small" / "dog.jpg").read_bytes()


def test_two_workers_share_the_port_and_metrics_count_every_request(model_cache, jpg):
    with ServerProcess(
        ["--model", MODEL, "--cache-dir", str(model_cache), "--workers", "2"]
    ) as srv:
        kids = _children(srv.proc.pid)
        assert len(kids) == 2, srv.output()
        owners, conns = [], []
        for _ in range(16):  # new connections: the kernel spreads them over the listeners
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            c.request("POST", PREDICT, body=jpg, headers={"content-type": "image/jpeg"})
            r = c.getresponse()
            assert r.status == 200 and b"top_k" in r.read()
            owners.append(_owner(kids, srv.port, c.sock.getsockname()[1]))
            conns.append(c)
        for c in conns:
            c.close()
        assert set(owners) == kids, owners  # both processes answered (1 in 2^15 fails)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(4):
                r = c.post(PREDICT, content=jpg, headers={"content-type": "image/jpeg"})
                assert r.status_code == 200
        for _ in range(6):  # each scrape on a new connection: any process, the same total
            text = httpx.get(srv.url + "/metrics", timeout=10).text
            assert _requests_total(text) == 20, text
            assert 'cvserve_queue_depth{model="tiny-resnet"}' in text
        assert "ready on " in srv.output() and "2 workers ready" in srv.output()


def test_a_worker_that_dies_is_replaced_and_its_counts_stay(model_cache, jpg, tmp_path):
    metrics_port = free_port()
    with Served(
        tmp_path, model_cache, "--workers", "2", "--metrics-port", str(metrics_port)
    ) as srv:
        metrics = f"http://127.0.0.1:{metrics_port}"

        def ready() -> bool:
            assert srv.proc.poll() is None, srv.output()
            try:
                return httpx.get(metrics + "/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False  # the parent is still starting

        wait_for(ready, 120, "every worker ready")
        for _ in range(6):
            r = httpx.post(srv.url + PREDICT, content=jpg, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200
        assert httpx.get(srv.url + "/metrics", timeout=5).status_code == 404  # its own port
        victim = min(_children(srv.proc.pid))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: srv.lines("ready again"), 120, "a replacement")
        kids = _children(srv.proc.pid)
        assert len(kids) == 2 and victim not in kids, srv.output()
        assert srv.lines(f"(pid {victim}) exited with status -9; starting another")
        for _ in range(4):
            r = httpx.post(srv.url + PREDICT, content=jpg, headers={"content-type": "image/jpeg"})
            assert r.status_code == 200
        text = httpx.get(metrics + "/metrics", timeout=5).text
        assert _requests_total(text) == 10, text  # the dead process's requests still count
        ready = httpx.get(metrics + "/readyz", timeout=5).json()
        assert ready == {"ready": True, "workers": 2, "workers_ready": 2}


def test_sigterm_drains_every_worker(model_cache, jpg, tmp_path):
    with Served(tmp_path, model_cache, *SLOW, "--workers", "2") as srv:
        wait_for(lambda: srv.lines("ready on"), 120, "every worker ready")
        kids = _children(srv.proc.pid)
        assert len(kids) == 2
        answers: list[object] = []

        def one() -> None:
            try:
                r = httpx.post(srv.url + PREDICT, content=jpg, timeout=60,
                               headers={"content-type": "image/jpeg"})  # fmt: skip
                answers.append(r.status_code)
            except httpx.TransportError as e:
                answers.append(repr(e))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()

        def in_flight() -> bool:  # both processes' gauges, summed
            text = httpx.get(srv.url + "/metrics", timeout=5).text
            m = re.search(r'^cvserve_queue_depth\{model="tiny-resnet"\} (\S+)$', text, re.M)
            return m is not None and float(m.group(1)) >= 4

        wait_for(in_flight, 30, "4 requests in flight")
        srv.sigterm()
        for t in threads:
            t.join(60)
        assert answers == [200] * 4, (answers, srv.output())
        assert srv.wait(60) == 0, srv.output()
        assert not any(_alive(pid) for pid in kids), srv.output()
        assert len(srv.lines("drained; shutting down")) == 2, srv.output()


def test_a_worker_that_fails_to_start_stops_the_others(model_cache, tmp_path):
    cmd = [sys.executable, "-m", "cvserve", "serve", "--port", str(free_port()),
           "--cache-dir", str(model_cache), "--model", MODEL, "--model", "no-such-model",
           "--workers", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "while starting: stopping the others" in r.stderr
    assert "no-such-model" in r.stderr and "ready on" not in r.stderr
    assert "Traceback" not in r.stderr


def test_a_port_in_use_is_one_line_before_any_worker_starts(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cache = tmp_path / "cache"
        cache.mkdir()
        r = subprocess.run(
            [sys.executable, "-m", "cvserve", "serve", "--model", MODEL, "--cache-dir",
             str(cache), "--port", str(taken), "--workers", "2"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{taken}" in errors[0], r.stderr
    assert "worker 0 started" not in r.stderr and not any(cache.iterdir())


# --- settings --------------------------------------------------------------------------
def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_stage_workers_is_the_renamed_flag():
    cfg = server_config_from_args(_args("--pipeline", "ocr", "--stage-workers", "0"))
    assert cfg.pipelines[0].stage_workers == 0 and cfg.workers == 1
    cfg = server_config_from_args(_args("--model", "m", "--workers", "3"))
    assert cfg.workers == 3


def test_the_old_pipeline_key_says_what_it_is_now(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("pipelines:\n  - {name: ocr, workers: 1}\n")
    with pytest.raises(ConfigError, match="'workers' is now 'stage_workers'") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    path.write_text("pipelines:\n  - {name: ocr, stage_workers: 1}\n")
    assert load_config(path).pipelines[0].stage_workers == 1


def test_workers_in_a_config_file_and_the_flag_overrides_it(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("server: {workers: 2}\nmodels:\n  - {name: m}\n")
    assert server_config_from_args(_args("--config", str(path))).workers == 2
    assert server_config_from_args(_args("--config", str(path), "--workers", "1")).workers == 1
    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        server_config_from_dict({"server": {"workers": 0}, "models": [{"name": "m"}]})


def test_grpc_with_several_workers_is_refused():
    with pytest.raises(ConfigError, match="gRPC port is not shared"):
        server_config_from_args(_args("--model", "m", "--workers", "2", "--grpc-port", "8001"))
    assert server_config_from_args(_args("--model", "m", "--grpc-port", "8001")).workers == 1


def test_each_worker_gets_its_share_of_the_cores_unless_set():
    cfg = ServerConfig(
        workers=2,
        models=(
            ModelConfig("a"),
            ModelConfig("b", batching=BatchConfig(instances=2)),
            ModelConfig("c", intra_op_threads=3),
        ),
        pipelines=(PipelineConfig("ocr"), PipelineConfig("dc", kind="ocr", cores=-1)),
    )
    w = replica_config(cfg, cores=8)
    assert (w.workers, w.reuse_port, w.preprocess_threads) == (1, True, 4)
    assert [m.intra_op_threads for m in w.models] == [4, 2, 3]
    assert [p.cores for p in w.pipelines] == [4, -1]
    assert w.max_pixels_in_flight >= cfg.max_pixels
    assert (
        replica_config(ServerConfig(workers=4, preprocess_threads=6), cores=2).preprocess_threads
        == 6
    )
    assert replica_config(ServerConfig(workers=4), cores=2).preprocess_threads == 1


def test_the_settings_a_worker_gets_read_back_the_same():
    cfg = ServerConfig(
        port=9000, workers=2, metrics_port=9100, drain_delay_ms=1500,
        models=(ModelConfig("a", batching=BatchConfig(max_batch_size=4, max_queue_wait_ms=None),
                            preprocess={"interpolation": "bilinear"}),),
        pipelines=(PipelineConfig("ocr", stage_workers=0, params={"use_cls": False}),),
    )  # fmt: skip
    assert server_config_from_dict(config_to_dict(cfg)) == cfg


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_workers_settings_touch_no_file_and_no_command_line(
    model_cache, jpg, tmp_path, monkeypatch
):
    """The settings hold the broker's password: nothing in the temporary folder (it would
    outlive a SIGKILLed parent) and nothing in any process's command line (``ps``)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    secret = "s3cret-pw"  # no pipeline: the broker is carried, never dialled
    broker = f"redis://:{secret}@127.0.0.1:9"
    with Served(tmp_path, model_cache, "--workers", "2", "--broker", broker) as srv:
        wait_for(lambda: srv.lines("ready on"), 120, "every worker ready")
        r = httpx.post(srv.url + PREDICT, content=jpg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200
        kids = _children(srv.proc.pid)
        assert len(kids) == 2
        for pid in kids:
            assert secret not in _cmdline(pid)
        written = [p for p in tmp.rglob("*") if p.is_file()]
        for path in written:
            assert secret.encode() not in path.read_bytes(), path
        assert not [p for p in written if p.suffix in (".json", ".yaml")], written


def test_cvserve_worker_takes_its_broker_from_the_environment(monkeypatch):
    monkeypatch.setenv("CVSERVE_BROKER", "redis://:pw@127.0.0.1:6379")
    args = build_parser().parse_args(["worker", "--pipeline", "ocr", "--stage", "rec"])
    assert args.broker == "redis://:pw@127.0.0.1:6379"
    monkeypatch.delenv("CVSERVE_BROKER")
    with pytest.raises(SystemExit):  # required where the environment does not give it
        build_parser().parse_args(["worker", "--pipeline", "ocr", "--stage", "rec"])
