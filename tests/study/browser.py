"""Load a page in headless Chromium and report what a reader would hit: console errors,
broken images, and a screenshot. Driven over the Chrome DevTools Protocol with
``websockets``; used by the report tests and by the end-to-end study test.

    from .browser import chromium_path, inspect_page
    report = inspect_page(out / "report.html")
    assert report.console_errors == [] and report.broken_images == 0
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BrowserError", "PageReport", "chromium_path", "inspect_page", "screenshot_std"]

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
)

# Every <img> that failed (or never finished) loading, after waiting for them to decode.
_BROKEN_IMAGES_JS = """
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    total: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0)
                .map(i => (i.getAttribute('src') || '').slice(0, 120)),
  };
})()
"""


class BrowserError(RuntimeError):
    """Chromium did not start, or the page did not load, in time."""


@dataclass
class PageReport:
    """What loading one page showed."""

    console_errors: list[str]
    broken_images: int  # <img> that did not load or decode
    screenshot_png: bytes
    images: int = 0  # how many <img> the page has
    broken_srcs: list[str] = field(default_factory=list)  # their src, 120 characters each
    title: str = ""


def chromium_path() -> str | None:
    """The Chromium binary: ``$CVSERVE_CHROMIUM``, else ``chromium`` on the PATH."""
    env = os.environ.get("CVSERVE_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def screenshot_std(png: bytes) -> float:
    """Standard deviation of the screenshot's gray levels (0 for a blank page)."""
    import io

    from PIL import Image, ImageStat

    with Image.open(io.BytesIO(png)) as im:
        return float(ImageStat.Stat(im.convert("L")).stddev[0])


def _wait_port(profile: Path, proc: subprocess.Popen, stderr: Path, timeout: float) -> str:
    """The browser's DevTools websocket URL, from ``DevToolsActivePort``."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            lines = marker.read_text().split()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = stderr.read_text(errors="replace")[-2000:] if stderr.exists() else ""
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "timed out"
    raise BrowserError(f"chromium {state} before opening DevTools:\n{tail}")


class _Session:
    """One CDP connection: commands by id, events collected as they arrive."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict[str, Any]] = []
        self.waiters: list[tuple[str, asyncio.Future]] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self.pending.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            self.events.append(msg)
            for method, fut in list(self.waiters):
                if msg.get("method") == method and not fut.done():
                    fut.set_result(msg)

    async def send(self, method: str, params: dict | None = None, session: str | None = None,
                   timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
        msg_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(fut, timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def expect(self, method: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append((method, fut))
        return fut


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            exc = d.get("exception", {})
            out.append(f"exception: {exc.get('description') or d.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            out.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            out.append(f"log {entry.get('source', '')}: {entry.get('text', '')}{where}")
    return out


async def _inspect(url: str, ws_url: str, width: int, height: int, timeout: float) -> PageReport:
    from websockets.asyncio.client import connect

    async with connect(ws_url, max_size=None, open_timeout=timeout) as ws:
        cdp = _Session(ws)
        try:
            target = await cdp.send("Target.createTarget", {"url": "about:blank"})
            attached = await cdp.send(
                "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
            )
            sid = attached["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                await cdp.send(f"{domain}.enable", session=sid)
            await cdp.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session=sid,
            )
            cdp.events.clear()  # only what the page itself causes counts
            loaded = cdp.expect("Page.loadEventFired")
            nav = await cdp.send("Page.navigate", {"url": url}, session=sid)
            if nav.get("errorText"):
                raise BrowserError(f"cannot open {url}: {nav['errorText']}")
            await asyncio.wait_for(loaded, timeout)
            images = await cdp.send(
                "Runtime.evaluate",
                {"expression": _BROKEN_IMAGES_JS, "awaitPromise": True, "returnByValue": True},
                session=sid,
                timeout=timeout,
            )
            value = images.get("result", {}).get("value") or {}
            title = await cdp.send(
                "Runtime.evaluate",
                {"expression": "document.title", "returnByValue": True},
                session=sid,
            )
            shot = await cdp.send(
                "Page.captureScreenshot", {"format": "png"}, session=sid, timeout=timeout
            )
            await asyncio.sleep(0.1)  # let late console/log events arrive
            return PageReport(
                console_errors=_errors(cdp.events),
                broken_images=len(value.get("broken", [])),
                broken_srcs=list(value.get("broken", [])),
                screenshot_png=base64.b64decode(shot["data"]),
                images=int(value.get("total", 0)),
                title=str(title.get("result", {}).get("value", "")),
            )
        finally:
            try:
                await cdp.send("Browser.close", timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort; the caller kills it
                pass
            cdp.reader.cancel()


def inspect_page(
    path: str | os.PathLike[str],
    *,
    width: int = 1280,
    height: int = 1600,
    timeout: float = 60.0,
    chromium: str | None = None,
) -> PageReport:
    """Open ``path`` (a file, as a ``file://`` URL) in headless Chromium and report on it.

    The screenshot is of the first ``width`` x ``height`` CSS pixels. Raises
    :class:`BrowserError` when Chromium is missing, does not start or the page does not load.
    """
    binary = chromium or chromium_path()
    if not binary:
        raise BrowserError("chromium not found (apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="cvserve-chromium-", ignore_cleanup_errors=True) as d:
        profile = Path(d) / "profile"
        profile.mkdir()
        stderr_path = Path(d) / "stderr.txt"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [binary, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            ws_url = _wait_port(profile, proc, stderr_path, timeout)
            return asyncio.run(_inspect(url, ws_url, width, height, timeout))
        finally:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            try:  # its helpers (zygote, renderer) share the session we started it in
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
