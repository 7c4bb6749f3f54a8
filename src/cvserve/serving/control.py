"""Models that change while the server runs: load, unload, versions, reload (Triton's model
control modes and repository extension, over cvserve's store).

:class:`Repository` is the one place that changes what a server serves after start-up;
the doors (``/v1``, KServe v2 HTTP and gRPC) call it, the poller and ``SIGHUP`` too.

A load opens every version the model's policy names (``version_policy``) that is not
loaded yet, in a thread, and warms it up (every batch size it will run); only then is it
*published*: requests that have not found a model yet go to the newest version at once
(one assignment on the event loop). A version no longer wanted is retired: a request
that found it but was not admitted yet goes on to its successor (or is refused, 404,
when the model was unloaded); those admitted finish there; once none is left it is
stopped and its runtimes dropped. Nothing a request was promised is lost in a swap.

What is served is untouched by a load that fails: a model not in the store or whose file
fails to open is :class:`~cvserve.serving.errors.LoadFailed` (400), one whose estimate
would not fit in memory :class:`~cvserve.serving.errors.ModelTooLarge` (507), both
naming why. One change at a time (a lock): loads are seconds of CPU each.

Modes (``model_control``): ``none``, what starts is served (the API answers the index;
loads and unloads are refused); ``explicit``, the API loads and unloads; ``poll``, every
``poll_interval_ms`` each configured model's versions in the store are compared with
those loaded (a new version, one removed, a file rewritten) and the difference applied.
``SIGHUP`` (:meth:`Repository.apply_config`) rereads the config file in any mode.

With ``--workers N`` each process has its own repository: a change made through the API
of one process is written to the control file (``CVSERVE_CONTROL_FILE``, given by the
parent) and every other process applies it within :data:`FOLLOW_S` (see
:meth:`Repository.follow`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cvserve.config import (
    ConfigError,
    ModelConfig,
    ServerConfig,
    model_config_from_dict,
    server_config_from_dict,
)
from cvserve.models import store, versions
from cvserve.serving.errors import BadRequest, LoadFailed, ModelTooLarge, NotServed
from cvserve.serving.loading import (
    check_fits,
    estimate_bytes,
    open_model,
    store_versions,
    wanted_versions,
)
from cvserve.serving.model import ModelServer
from cvserve.serving.state import ServerState

__all__ = [
    "CONTROL_FILE_ENV",
    "FOLLOW_S",
    "IndexEntry",
    "Repository",
    "load_parameters",
    "repository",
]

log = logging.getLogger(__name__)

#: Environment variable naming the control file the processes of ``--workers`` share.
CONTROL_FILE_ENV = "CVSERVE_CONTROL_FILE"
#: How often a process of ``--workers`` looks at the control file.
FOLLOW_S = 0.2
#: A load beside served models warms up at this pace (``ModelServer.warm_up``): it rests
#: as long as each run took, leaving the served models most of the cores meanwhile.
WARM_UP_PACE = 1.0
#: How often a retired version is checked for requests still admitted.
_IDLE_CHECK_S = 0.01


def repository(state: ServerState) -> Repository:
    """The server's repository (LoadFailed when it has none: a bare state in a test)."""
    if state.repository is None:
        raise LoadFailed("this server has no model repository")
    return state.repository


def load_parameters(params: dict[str, Any]) -> dict[str, Any] | None:
    """A v2 load's parameters (HTTP JSON or gRPC, as tritonclient sends them) to the
    settings to load with: ``config``, a JSON string of the model's settings in cvserve's
    keys (a config file's model entry), or None. ``file:`` parameters (a model sent with
    the request) are refused: models come from the store."""
    if any(k.startswith("file:") for k in params):
        raise LoadFailed("loading a model sent with the request is not supported: add it to "
                         "the store (cvserve models add) and load it by name")  # fmt: skip
    raw = params.get("config")
    if raw is None:
        return None
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as e:
        raise BadRequest(f"the config parameter is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the config parameter must be a JSON object of model settings")
    return doc


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (Triton's ``RepositoryIndexResponse.ModelIndex``):
    ``state`` is ``READY``, ``UNAVAILABLE`` or ``LOADING``."""

    name: str
    version: str
    state: str
    reason: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "state": self.state,
                "reason": self.reason}  # fmt: skip


class Repository:
    """Loads and unloads the models of one server process while it runs."""

    def __init__(self, state: ServerState, config: ServerConfig) -> None:
        self.state = state
        self.config = config
        #: The settings each model is (re)loaded with: the config's, then the API's.
        self.configs: dict[str, ModelConfig] = {mc.name: mc for mc in config.models}
        #: Why a model is not loaded (a failed load, an unload), by name.
        self.reasons: dict[str, str] = {}
        self.loading: set[str] = set()
        #: (version, sidecar mtime) of each loaded version when it was opened, by name:
        #: what ``poll`` compares the store with.
        self._seen: dict[str, dict[str, float]] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._control = os.environ.get(CONTROL_FILE_ENV) or None
        self._control_seq = 0

    @property
    def mode(self) -> str:
        return self.config.model_control

    # -- the index --------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every loaded version (READY), every model being loaded (LOADING), every model
        configured or in the store that is not loaded (UNAVAILABLE, with why)."""
        rows: list[IndexEntry] = []
        for name, loaded in sorted(self.state.versions.items()):
            rows += [IndexEntry(name, v, "READY") for v in loaded]
        if ready_only:
            return rows
        served = set(self.state.versions)
        for name in sorted(self.loading - served):
            rows.append(IndexEntry(name, "", "LOADING"))
        others = set(self.configs) | {e.name for e in store.list_models(self.config.cache_dir)
                                      if e.built}  # fmt: skip
        for name in sorted(others - served - self.loading):
            rows.append(IndexEntry(name, "", "UNAVAILABLE", self.reasons.get(name, "unloaded")))
        return rows

    def describe(self) -> list[dict[str, Any]]:
        """Every loaded version's own description (``GET /v1/models``)."""
        return [ms.describe() for loaded in self.state.versions.values()
                for ms in loaded.values()]  # fmt: skip

    def held_bytes(self) -> int:
        """Memory the loaded models take, as estimated before each was opened."""
        total = 0
        for loaded in self.state.versions.values():
            for ms in loaded.values():
                if isinstance(ms, ModelServer):
                    total += estimate_bytes(ms.onnx_path, ms.config, ms.meta)
        return total

    # -- the API ------------------------------------------------------------------------
    def _check_mode(self, what: str) -> None:
        if self.mode != "explicit":
            raise LoadFailed(
                f"cannot {what}: model control is {self.mode!r}; start the server with "
                "--model-control explicit for the repository API to load and unload"
            )

    def settings_for(self, name: str, override: dict[str, Any] | None = None) -> ModelConfig:
        """The settings ``name`` loads with: ``override`` (a model entry of a config file,
        as the API's ``config`` parameter), else the config's entry, else the first
        configured model's settings under this name (the server's flags)."""
        if override is not None:
            if not isinstance(override, dict):
                raise LoadFailed("the config parameter must be a JSON object of model settings")
            try:
                return model_config_from_dict({**override, "name": name})
            except ConfigError as e:
                raise LoadFailed(str(e)) from None
        if name in self.configs:
            return self.configs[name]
        try:
            store.validate_name(name)
        except ValueError as e:
            raise LoadFailed(str(e)) from None
        template = next(iter(self.configs.values()), None)
        if template is None:
            return ModelConfig(name=name)
        return replace(template, name=name, model=None, version_policy="latest:1")

    async def load(self, name: str, override: dict[str, Any] | None = None) -> list[str]:
        """The API's load (explicit mode): ``name`` at its policy's versions; a version
        already loaded is reopened only when its settings change. Returns the versions
        served."""
        self._check_mode("load")
        if name in self.state.pipelines:
            raise LoadFailed(f"{name} is a pipeline: pipelines are not loaded or unloaded")
        served = await self.ensure(name, self.settings_for(name, override), reload=False)
        self._tell_others("load", name, override)
        return served

    async def unload(self, name: str) -> None:
        """The API's unload (explicit mode): every version of ``name``."""
        self._check_mode("unload")
        await self.remove(name, "unloaded")
        self._tell_others("unload", name, None)

    # -- changes ------------------------------------------------------------------------
    async def ensure(self, name: str, mc: ModelConfig, *, reload: bool) -> list[str]:
        """Serve ``name`` with settings ``mc`` at the versions its policy names in the store
        now: open the missing ones (all of them when the settings changed, or ``reload``),
        publish, retire the rest."""
        async with self._lock:
            self.loading.add(name)
            try:
                return await self._ensure(name, mc, reload)
            except (LoadFailed, ModelTooLarge) as e:
                if name not in self.state.versions:
                    self.reasons[name] = str(e)
                raise
            finally:
                self.loading.discard(name)

    async def _ensure(self, name: str, mc: ModelConfig, reload: bool) -> list[str]:
        cache = self.config.cache_dir
        try:
            found = await asyncio.to_thread(store_versions, mc, cache)
            wanted = wanted_versions(mc, found)
        except (LookupError, ValueError, store.ModelBuildError) as e:
            raise LoadFailed(f"cannot load {name}: {e}") from None
        current = dict(self.state.versions.get(name, {}))
        changed = (
            reload
            or self.configs.get(name, mc) != mc
            or any(getattr(ms, "config", mc) != mc for ms in current.values())
        )
        seen = self._seen.get(name, {})
        rewritten = {v for v in current if v in seen and _stamp(mc, int(v), cache) != seen[v]}
        keep = {} if changed else {
            v: current[v] for v in map(str, wanted) if v in current and v not in rewritten
        }  # fmt: skip
        to_open = [v for v in wanted if str(v) not in keep]
        held = self.held_bytes()  # the versions replaced stay until their requests finish
        opened: dict[str, ModelServer] = {}
        try:
            for v in to_open:
                meta = found[v]
                path = store.version_dir(mc.store_name, v, cache) / meta.onnx_file
                need = estimate_bytes(str(path), mc, meta)
                check_fits(need, self.config, held, f"model {name} version {v}")
                t0 = time.perf_counter()
                try:
                    ms = await asyncio.to_thread(
                        open_model, self.config, mc, v, meta, self.state.pool,
                        self.state.metrics, warm=True, pace=WARM_UP_PACE,
                    )  # fmt: skip
                except Exception as e:  # onnxruntime's own errors: the file is the cause
                    raise LoadFailed(f"cannot load {name} version {v} ({path}): {e}") from e
                await ms.start()
                opened[str(v)] = ms
                held += need
                log.info("%s version %s: opened and warmed up in %.2f s", name, v,
                         time.perf_counter() - t0)  # fmt: skip
        except BaseException:
            for ms in opened.values():  # nothing half-done stays
                await self._stop(ms)
            raise
        served = {**keep, **opened}
        self.state.publish(name, served)
        self.configs[name] = mc
        self.reasons.pop(name, None)
        self._seen[name] = {v: _stamp(mc, int(v), cache) for v in served}
        newest = self.state.models.get(name)
        for v, ms in current.items():
            if served.get(v) is not ms:
                self._retire(ms, newest)
        return list(served)

    async def remove(self, name: str, why: str) -> None:
        """Stop serving ``name`` (every version): requests admitted finish first."""
        async with self._lock:
            current = self.state.versions.get(name)
            if current is None:
                if name in self.state.pipelines:
                    raise LoadFailed(f"{name} is a pipeline: pipelines are not unloaded")
                raise NotServed(f"no model named {name!r} is loaded",
                                models=list(self.state.versions))  # fmt: skip
            self.state.publish(name, {})
            self.reasons[name] = why
            self._seen.pop(name, None)
            for ms in current.values():
                self._retire(ms, None)

    def _retire(self, ms: Any, successor: Any) -> None:
        """``ms`` gets no new request (they go to ``successor``, or 404 without one); it
        stops once those it admitted are answered."""
        ms.successor = successor
        ms.retired = True
        task = asyncio.ensure_future(self._drain_and_stop(ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_and_stop(self, ms: Any) -> None:
        while ms.inflight > 0:
            await asyncio.sleep(_IDLE_CHECK_S)
        await self._stop(ms)
        log.info("%s version %s: unloaded", ms.name, ms.version)

    @staticmethod
    async def _stop(ms: Any) -> None:
        await ms.stop()
        if hasattr(ms, "release"):
            ms.release()  # the runtimes go with their last reference (no full collection:
            # one would scan the whole heap, frozen at start-up, on the event loop)

    async def close(self) -> None:
        """At shutdown: versions still draining are stopped now."""
        for task in list(self._tasks):
            task.cancel()

    # -- poll and SIGHUP ---------------------------------------------------------------
    def _store_changed(self, name: str, mc: ModelConfig) -> bool | None:
        """Whether the store's versions of ``name`` differ from those loaded (None: the
        model is gone from the store). Runs in a thread."""
        found = versions.model_versions(mc.store_name, self.config.cache_dir)
        if not found:
            return None
        wanted = [str(v) for v in _select(mc, found)]
        seen = self._seen.get(name, {})
        if set(wanted) != set(seen):
            return True
        return any(_stamp(mc, int(v), self.config.cache_dir) != seen[v] for v in wanted)

    async def poll_once(self) -> None:
        """``poll``: apply what changed in the store since the last look."""
        for name, mc in list(self.configs.items()):
            try:
                changed = await asyncio.to_thread(self._store_changed, name, mc)
                if changed is None:
                    if name in self.state.versions:
                        log.info("poll: %s is gone from the store: unloading", name)
                        await self.remove(name, "removed from the store")
                elif changed:
                    log.info("poll: %s changed in the store: loading", name)
                    await self.ensure(name, mc, reload=False)
            except Exception as e:  # one model's failure never stops the poller
                log.warning("poll: %s: %s", name, e)

    async def run_poller(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_ms / 1000.0)
            await self.poll_once()

    async def apply_config(self, new: ServerConfig) -> dict[str, list[str]]:
        """``SIGHUP``: serve ``new``'s models: load those added, unload those removed,
        reload those whose settings changed (a swap, as any load). Server settings and
        pipelines need a restart (logged). Returns what changed."""
        old = {mc.name: mc for mc in self.config.models}
        want = {mc.name: mc for mc in new.models}
        done: dict[str, list[str]] = {"added": [], "removed": [], "retuned": []}
        for name in old.keys() - want.keys():
            if name in self.state.versions:
                await self.remove(name, "removed from the config")
            self.configs.pop(name, None)
            done["removed"].append(name)
        for name, mc in want.items():
            if name not in old or name not in self.state.versions:
                await self.ensure(name, mc, reload=False)
                done["added"].append(name)
            elif old[name] != mc:
                await self.ensure(name, mc, reload=True)
                done["retuned"].append(name)
        if replace(new, models=()) != replace(self.config, models=()):
            log.warning("config reload: server settings and pipelines changed too: they "
                        "take effect at the next restart")  # fmt: skip
        self.config = replace(self.config, models=new.models)
        return done

    # -- --workers: one process's API change, followed by the others -------------------
    def _tell_others(self, op: str, name: str, override: dict[str, Any] | None) -> None:
        if self._control is None:
            return
        path = Path(self._control)
        try:
            with open(path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "op": op, "name": name,
                                    "config": override}) + "\n")  # fmt: skip
        except OSError as e:
            log.warning("cannot write the control file %s: %s", path, e)

    async def follow(self) -> None:
        """One process of several: apply the loads and unloads the others wrote to the
        control file (one JSON line each, appended), in order."""
        if self._control is None:
            return
        path = Path(self._control)
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            for line in lines[self._control_seq :]:
                self._control_seq += 1
                try:
                    op = json.loads(line)
                    if op["pid"] == os.getpid():
                        continue
                    if op["op"] == "config":
                        await self.apply_config(server_config_from_dict(op["config"]))
                    elif op["op"] == "load":
                        await self.ensure(op["name"],
                                          self.settings_for(op["name"], op.get("config")),
                                          reload=False)  # fmt: skip
                    elif op["name"] in self.state.versions:
                        await self.remove(op["name"], "unloaded")
                except Exception as e:
                    log.warning("control file: %s: %s", line[:200], e)

    def start_background(self) -> list[asyncio.Task]:
        """The tasks this mode runs beside the server: the poller, the follower."""
        tasks = []
        if self.mode == "poll":
            tasks.append(asyncio.ensure_future(self.run_poller()))
        if self._control is not None:
            # a process started late (a replacement) replays every change from the first
            self._control_seq = 0
            tasks.append(asyncio.ensure_future(self.follow()))
        for t in tasks:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return tasks


def _select(mc: ModelConfig, found: dict) -> list[int]:
    try:
        return wanted_versions(mc, found)
    except ValueError:
        return []


def _stamp(mc: ModelConfig, version: int, cache: str | None) -> float:
    """When version ``version``'s sidecar was last written (0 when it is gone)."""
    try:
        folder = store.version_dir(mc.store_name, version, cache)
        return (folder / store.SIDECAR_FILE).stat().st_mtime
    except (OSError, ValueError):
        return 0.0
