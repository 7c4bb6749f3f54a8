"""A closed loop against refusals: the bench counts every 429 whether it waits their
Retry-After or not, says in its table how long the refused clients backed off, and with
``honor_retry_after=False`` sends again at once (as perf_analyzer, hey or locust do)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from rich.console import Console

from cvserve.bench import BenchConfig, run_bench
from cvserve.bench.console import summary_table
from cvserve.serving.process import free_port

READY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
REFUSAL = (
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\ncontent-type: application/json\r\n"
    b'content-length: 21\r\n\r\n{"error": "too many"}'
)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every predict on a keep-alive connection: 429 with Retry-After: 1 (GET: 200)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            await reader.readexactly(length)
            writer.write(READY if head.startswith(b"GET ") else REFUSAL)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@pytest.fixture(scope="module")
def refusing_url() -> Iterator[str]:
    loop = asyncio.new_event_loop()
    port = free_port()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(_handle, "127.0.0.1", port))
        started.set()
        loop.run_forever()
        server.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(10)
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)


def _render(result) -> str:
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(summary_table(result))
    return console.export_text()


def test_refusals_are_counted_and_the_backoff_shown(refusing_url, tiny_images):
    honour = run_bench(BenchConfig(url=refusing_url, model="m", images=tiny_images,
                                   concurrency=[2], duration=2.5, warmup=0.0))  # fmt: skip
    (p,) = honour.points
    refused = p.errors["by_status"]["429"]
    assert p.ok == 0 and refused == p.requests > 0
    # each refused client waited its Retry-After (1 s) before sending again
    assert 0 < p.retry_wait_s <= refused and p.retry_wait_s == int(p.retry_wait_s)
    text = _render(honour)
    assert f"errors at c=2: {refused} (429:{refused})" in text
    assert "backed off at c=2" in text and "--no-retry-after" in text

    at_once = run_bench(BenchConfig(url=refusing_url, model="m", images=tiny_images,
                                    concurrency=[2], requests=200, warmup=0.0,
                                    honor_retry_after=False))  # fmt: skip
    (q,) = at_once.points
    assert q.errors["by_status"] == {"429": q.requests} and q.requests >= 200
    assert q.retry_wait_s == 0
    text = _render(at_once)
    assert "errors at c=2" in text and "backed off" not in text
