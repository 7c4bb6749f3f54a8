"""Hostile clients against a server that requires an API key: one attack at a time, and
for each the server's peak RSS and open descriptors (read from ``/proc``), its 5xx answers
(from ``/metrics``), whether ``/healthz`` kept answering (a new connection every 0.25 s),
and a legitimate client's success rate and p99 during the attack against a quiet run.

Attacks (issue 20, "a hostile-client benchmark"):

- ``grpc-flood``: ``--grpc-calls`` concurrent ``ModelInfer`` calls of ``--grpc-mb`` MB
  each, with no key, again and again;
- ``huge-header``: 4 connections at a time, each sending a ``--header-mb`` MB
  ``Authorization`` header;
- ``idle``: ``--connections`` connections that send nothing;
- ``slowloris``: ``--connections`` connections that send half a head, then a header line
  now and then, never the end;
- ``stalled-upload``: ``--stalled`` uploads (with the key) that declare ``--upload-mb``
  MB, send half, and stop (those the server's budget of bodies being received has no
  room for are answered 503 before their body is read: "(N 503)");
- ``half-body``: uploads that send half their body and hang up, again and again;
- ``random-bytes``: new connections to the HTTP and gRPC ports sending random bytes.

Each attack runs in a process of its own (so that it does not take the measuring
process's GIL) for ``--duration`` seconds. The goals: RSS under 2x its idle value, no
5xx, ``/healthz`` always answering, the legitimate client's success rate 100% and its p99
within 3x of the quiet run. "RSS after": a few seconds after the attack, what the
server kept (it returns freed heap pages once its memory has grown; see
``cvserve.serving.server``). A 503 the HTTP protocol answers before the app (no room
for a body, too many busy connections) is an honest refusal with ``Retry-After``, not
counted in the 5xx column, which counts the app's answers (``/metrics``).

    python benchmarks/hostile.py                         # 2,000 connections, 10 s each
    python benchmarks/hostile.py --quick                 # smaller and 4 s each
    ulimit -n 65536 && python benchmarks/hostile.py --connections 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from cvserve.bench.results import write_benchmark
from cvserve.models import store
from cvserve.serving.process import ServerProcess, free_port

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
KEY = "hostile-benchmark-key"
#: The gRPC flood last: what it leaves in memory must not count against the others.
ATTACKS = ("huge-header", "idle", "slowloris", "stalled-upload", "half-body", "random-bytes",
           "grpc-flood")  # fmt: skip
MB = 1024 * 1024
#: After an attack, how long the server is given to return freed memory before its RSS
#: is read again ("RSS after").
RSS_SETTLE_S = 3.0


# --- the attacks (run in a child process: ``--attack NAME``) ---------------------------
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open(host: str, port: int, n: int) -> list[Conn]:
    conns: list[Conn] = []
    for i in range(0, n, 200):  # in waves: the listen backlog is finite
        got = await asyncio.gather(
            *(asyncio.open_connection(host, port) for _ in range(min(200, n - i))),
            return_exceptions=True,
        )
        conns += [c for c in got if not isinstance(c, BaseException)]
    return conns


async def _closed(conns: list[Conn], answers: list[bytes] | None = None) -> int:
    """How many of ``conns`` the server has closed (read to the end at once); what it
    answered before closing goes to ``answers``."""

    async def one(r: asyncio.StreamReader) -> bool:
        try:
            got = await asyncio.wait_for(r.read(), 0.2)
            if answers is not None and got:
                answers.append(got)
            return True
        except (TimeoutError, OSError, ConnectionError):
            return isinstance(r.exception(), OSError)

    got = await asyncio.gather(*(one(r) for r, _ in conns))
    for _, w in conns:
        w.close()
    return sum(got)


async def _send(w: asyncio.StreamWriter, data: bytes) -> bool:
    try:
        w.write(data)
        await w.drain()
        return True
    except (OSError, ConnectionError):
        return False


async def _held(a, stop: float) -> dict:
    """idle or slowloris: open the connections, keep them, count how many the server
    closed by the end."""
    conns = await _open(a.host, a.port, a.connections)
    if a.attack == "slowloris":
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        await asyncio.gather(*(_send(w, head) for _, w in conns))
    while time.monotonic() < stop:
        await asyncio.sleep(min(1.0, max(0.0, stop - time.monotonic())))
        if a.attack == "slowloris":
            await asyncio.gather(*(_send(w, b"X-a: b\r\n") for _, w in conns))
    return {"opened": len(conns), "closed_by_server": await _closed(conns)}


async def _huge_header(a, stop: float) -> dict:
    sent_total, refused = [], 0
    chunk = b"a" * (256 * 1024)

    async def one() -> None:
        nonlocal refused
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection(a.host, a.port)
            except OSError:
                continue
            sent = 0
            ok = await _send(w, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
            while ok and sent < a.header_mb * MB and time.monotonic() < stop:
                ok = await _send(w, chunk)
                sent += len(chunk) if ok else 0
            w.close()
            if ok and sent < a.header_mb * MB:
                continue  # cut short by the clock, not by the server: not counted
            refused += not ok
            sent_total.append(sent)

    await asyncio.gather(*(one() for _ in range(4)))
    return {"headers": len(sent_total), "refused_mid_header": refused,
            "max_mb_sent": round(max(sent_total, default=0) / MB, 1)}  # fmt: skip


def _upload_head(a, length: int, key: bool = True) -> bytes:
    auth = f"Authorization: Bearer {KEY}\r\n" if key else ""
    return (f"POST /v1/models/{a.model}:predict HTTP/1.1\r\nHost: x\r\n{auth}"
            f"Content-Type: image/jpeg\r\nContent-Length: {length}\r\n\r\n").encode()  # fmt: skip


async def _stalled(a, stop: float) -> dict:
    length = int(a.upload_mb * MB)
    conns = await _open(a.host, a.port, a.stalled)
    half = b"\xff" * (length // 2)
    sent = await asyncio.gather(*(_send(w, _upload_head(a, length) + half) for _, w in conns))
    while time.monotonic() < stop:
        await asyncio.sleep(min(0.5, max(0.0, stop - time.monotonic())))
    answers: list[bytes] = []
    closed = await _closed(conns, answers)
    # 503 before the body was read: the server's budget of bodies being received was full
    refused = sum(x.startswith(b"HTTP/1.1 503") for x in answers)
    return {"uploads": len(conns), "half_sent": sum(sent), "closed_by_server": closed,
            "refused_503": refused}  # fmt: skip


async def _half_body(a, stop: float) -> dict:
    n = 0
    length = 4 * MB

    async def one() -> None:
        nonlocal n
        while time.monotonic() < stop:
            try:
                _, w = await asyncio.open_connection(a.host, a.port)
            except OSError:
                continue
            await _send(w, _upload_head(a, length) + b"\xff" * (length // 2))
            w.transport.abort()  # hang up mid-body
            n += 1

    await asyncio.gather(*(one() for _ in range(8)))
    return {"hung_up": n}


async def _random_bytes(a, stop: float) -> dict:
    rng = random.Random(0)
    n = 0

    async def one(port: int) -> None:
        nonlocal n
        while time.monotonic() < stop:
            try:
                r, w = await asyncio.open_connection(a.host, port)
            except OSError:
                continue
            await _send(w, rng.randbytes(rng.choice((16, 1024, 65536))))
            try:
                await asyncio.wait_for(r.read(4096), 1.0)
            except (TimeoutError, OSError, ConnectionError):
                pass
            w.close()
            n += 1

    ports = [a.port] + ([a.grpc_port] if a.grpc_port else [])
    await asyncio.gather(*(one(p) for p in ports for _ in range(4)))
    return {"connections": n}


async def _grpc_flood(a, stop: float) -> dict:
    import grpc

    # a ModelInferRequest by hand: model_name (1) and one raw_input_contents (7)
    name = a.model.encode()
    payload = b"\0" * int(a.grpc_mb * MB)
    msg = b"\x0a" + bytes([len(name)]) + name + b"\x3a" + _varint(len(payload)) + payload
    codes: dict[str, int] = {}
    opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"{a.host}:{a.grpc_port}", options=opts) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")

        async def one() -> None:
            while time.monotonic() < stop:
                try:
                    await call(msg, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(a.grpc_calls)))
    return {"calls": codes}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def run_attack(a) -> dict:
    stop = time.monotonic() + a.duration
    fn = {"grpc-flood": _grpc_flood, "huge-header": _huge_header, "idle": _held,
          "slowloris": _held, "stalled-upload": _stalled, "half-body": _half_body,
          "random-bytes": _random_bytes}[a.attack]  # fmt: skip
    return asyncio.run(fn(a, stop))


# --- measuring (the main process) -------------------------------------------------------
def _proc(pid: int) -> tuple[float, int]:
    """(RSS in MB, open descriptors) of ``pid``."""
    rss = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return rss, 0
    return rss, fds


def _server_errors(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("cvserve_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Watch:
    """While an attack runs: the server's RSS and descriptors, /healthz on new
    connections, and a legitimate client in a closed loop."""

    def __init__(self, url: str, pid: int, model: str, jpg: bytes) -> None:
        self.url, self.pid, self.model, self.jpg = url, pid, model, jpg
        self.stop = threading.Event()
        self.rss: list[float] = []
        self.fds: list[int] = []
        self.health: list[bool] = []
        self.legit: list[tuple[bool, float]] = []
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._sample, self._probe, self._client)]  # fmt: skip

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            rss, fds = _proc(self.pid)
            self.rss.append(rss)
            self.fds.append(fds)

    def _probe(self) -> None:
        while not self.stop.wait(0.25):
            try:
                ok = httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.health.append(ok)

    def _client(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}", "content-type": "image/jpeg"}
        with httpx.Client(base_url=self.url, timeout=10, headers=headers) as c:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v1/models/{self.model}:predict", content=self.jpg)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.legit.append((ok, time.perf_counter() - t0))

    def summary(self) -> dict:
        lat = np.array([t for ok, t in self.legit if ok]) * 1000.0
        return {
            "rss_peak_mb": round(max(self.rss, default=0.0), 1),
            "fds_peak": max(self.fds, default=0),
            "healthz_ok": sum(self.health), "healthz_probes": len(self.health),
            "legit_requests": len(self.legit),
            "legit_success": sum(ok for ok, _ in self.legit) / max(len(self.legit), 1),
            "legit_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        }  # fmt: skip


def attack_argv(a, name: str, url: str, grpc_port: int | None) -> list[str]:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    return [sys.executable, __file__, "--attack", name, "--host", host, "--port", port,
            "--grpc-port", str(grpc_port or 0), "--model", a.model, "--duration", str(a.duration),
            "--connections", str(a.connections), "--grpc-calls", str(a.grpc_calls),
            "--grpc-mb", str(a.grpc_mb), "--header-mb", str(a.header_mb),
            "--stalled", str(a.stalled), "--upload-mb", str(a.upload_mb)]  # fmt: skip


def _idle(srv: ServerProcess, a, jpg: bytes, seconds: float) -> tuple[dict, float, int]:
    """Warm a fresh server up with the legitimate client (the row of a quiet run), then
    read its idle RSS and descriptors."""
    pid = srv.proc.pid
    with Watch(srv.url, pid, a.model, jpg) as w:
        time.sleep(seconds)
    rss, fds = _proc(pid)
    return {**w.summary(), "server_errors": 0, "attack": {}}, rss, fds


def attack_row(a, name: str, srv: ServerProcess, grpc_port: int | None, jpg: bytes) -> dict:
    """One attack against ``srv`` while it is watched; the row of the table."""
    url, pid = srv.url, srv.proc.pid
    idle_fds = _proc(pid)[1]
    before = _server_errors(url)
    with Watch(url, pid, a.model, jpg) as w:
        proc = subprocess.run(attack_argv(a, name, url, grpc_port), capture_output=True,
                              text=True, timeout=a.duration + 120)  # fmt: skip
    try:
        detail = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        detail = {"error": proc.stderr[-500:]}
    settle = time.monotonic() + 60  # the server lets go of what the attack left
    while time.monotonic() < settle and _proc(pid)[1] > idle_fds + 20:
        time.sleep(0.5)
    time.sleep(RSS_SETTLE_S)  # and gives memory back (it looks every second)
    return {**w.summary(), "server_errors": _server_errors(url) - before,
            "rss_after_mb": round(_proc(pid)[0], 1), "attack": detail}  # fmt: skip


def measure(a, serve_args: list[str], grpc_port: int | None, jpg: bytes) -> dict:
    """Each attack against a fresh server (unless ``--one-server``): what one attack
    leaves in memory must not count against the next."""
    rows: dict[str, dict] = {}
    idle: dict[str, dict] = {}
    srv = None
    try:
        for name in ["quiet", *a.attacks]:
            if name == "grpc-flood" and not grpc_port:
                continue
            if srv is None or not a.one_server:
                if srv is not None:
                    srv.stop()
                srv = ServerProcess(serve_args).start()
                warm = a.duration if not rows else min(a.duration, 2.0)
                row, rss, fds = _idle(srv, a, jpg, warm)
                rows.setdefault("quiet", row)
            idle[name] = {"rss_mb": round(rss, 1), "fds": fds}
            if name != "quiet":
                rows[name] = attack_row(a, name, srv, grpc_port, jpg)
                rows[name]["idle_rss_mb"] = idle[name]["rss_mb"]
                if srv.proc.poll() is not None:
                    rows[name]["server_exited"] = True
                    srv = None
            print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    finally:
        if srv is not None:
            srv.stop()
    return {"idle": idle, "rows": rows}


def goals(res: dict) -> dict[str, bool]:
    quiet_p99 = res["rows"]["quiet"]["legit_p99_ms"] or 0.0
    out = {}
    for name, r in res["rows"].items():
        if name == "quiet":
            continue
        out[name] = (
            r["rss_peak_mb"] < 2 * r["idle_rss_mb"]
            and not r.get("server_exited")
            and r["server_errors"] == 0
            and r["healthz_ok"] == r["healthz_probes"]
            and r["legit_success"] == 1.0
            and r["legit_p99_ms"] is not None
            and r["legit_p99_ms"] <= 3 * quiet_p99
        )
    return out


def _closed_by(row: dict) -> str:
    d = row["attack"]
    if "closed_by_server" in d:
        out = f"{d['closed_by_server']}/{d.get('opened', d.get('uploads'))}"
        return out + (f" ({d['refused_503']} 503)" if d.get("refused_503") else "")
    if "refused_mid_header" in d:
        return f"{d['refused_mid_header']}/{d['headers']} (<= {d['max_mb_sent']} MB sent)"
    if "calls" in d:
        return " ".join(f"{k}:{v}" for k, v in d["calls"].items())
    return "-"


def table(res: dict, met: dict[str, bool], title: str) -> Table:
    t = Table(title=title)
    for col in ("attack", "RSS peak (idle)", "RSS after", "fds peak", "5xx", "/healthz", "legit ok", "legit p99",
                "closed by server", "goal"):  # fmt: skip
        t.add_column(col, justify="right")
    for name, r in res["rows"].items():
        p99 = "-" if r["legit_p99_ms"] is None else f"{r['legit_p99_ms']:.0f} ms"
        t.add_row(
            name, f"{r['rss_peak_mb']:.0f} MB ({r.get('idle_rss_mb', r['rss_peak_mb']):.0f})",
            "-" if r.get("rss_after_mb") is None else f"{r['rss_after_mb']:.0f} MB", str(r["fds_peak"]), f"{r['server_errors']:.0f}",
            f"{r['healthz_ok']}/{r['healthz_probes']}",
            f"{100 * r['legit_success']:.0f}% of {r['legit_requests']}", p99, _closed_by(r),
            "-" if name == "quiet" else ("met" if met[name] else "NOT met"),
        )  # fmt: skip
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-resnet")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--serve-args", default="", help="more flags of the server started")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="which, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per attack")
    p.add_argument("--connections", type=int, default=2000, help="idle/slowloris sockets")
    p.add_argument("--grpc-calls", type=int, default=30)
    p.add_argument("--grpc-mb", type=float, default=30.0)
    p.add_argument("--header-mb", type=float, default=200.0)
    p.add_argument("--stalled", type=int, default=20, help="stalled uploads")
    p.add_argument("--upload-mb", type=float, default=32.0, help="each stalled upload's size")
    p.add_argument("--quick", action="store_true",
                   help="4 s each, 500 connections, 8 gRPC calls, 8 stalled uploads")  # fmt: skip
    p.add_argument("--one-server", action="store_true",
                   help="every attack against one server (default: a fresh one each)")  # fmt: skip
    p.add_argument("--out", default=str(HERE / "results" / "hostile.json"))
    # one attack, in a child process (internal)
    p.add_argument("--attack", default=None, help=argparse.SUPPRESS)
    p.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--grpc-port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.attack:
        print(json.dumps(run_attack(a)), flush=True)
        return 0
    if a.quick:  # what is not given on the command line
        for key, value in (("duration", 4.0), ("connections", 500), ("grpc_calls", 8),
                           ("stalled", 8)):  # fmt: skip
            if getattr(a, key) == p.get_default(key):
                setattr(a, key, value)
    a.attacks = [x for x in a.attacks.split(",") if x]
    unknown = set(a.attacks) - set(ATTACKS)
    if unknown:
        p.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")

    store.ensure_built(a.model, a.cache_dir, progress=lambda s: print(s, file=sys.stderr))
    jpg = (DATA / "images" / "small" / "dog.jpg").read_bytes()
    grpc_port = None
    try:
        import grpc  # noqa: F401

        grpc_port = free_port()
    except ImportError:
        print("no grpcio: the gRPC attack is skipped", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text(KEY + "\n")
        keys.chmod(0o600)
        args = ["--model", a.model, "--api-key-file", str(keys), *shlex.split(a.serve_args)]
        args += ["--grpc-port", str(grpc_port)] if grpc_port else []
        args += ["--cache-dir", a.cache_dir] if a.cache_dir else []
        res = measure(a, args, grpc_port, jpg)
    met = goals(res)
    title = (f"hostile clients: {a.model}, {a.duration:g} s each, {a.connections} connections; "
             f"idle RSS {res['idle']['quiet']['rss_mb']:.0f} MB")  # fmt: skip
    Console(width=140).print(table(res, met, title))
    ok = all(met.values())
    out = write_benchmark(a.out, "hostile", a, result=res, goals_met=met, goal_met=ok)
    print(f"wrote {out}; goals (RSS < 2x idle, 0 5xx, /healthz always, legit 100% and p99 "
          f"<= 3x quiet): {'met' if ok else 'NOT met'}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
