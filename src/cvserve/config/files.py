"""A config file (YAML, or the same mapping as JSON) to the typed settings and back."""

from __future__ import annotations

import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from cvserve.config.checks import ConfigError
from cvserve.config.model import BatchConfig, ModelConfig
from cvserve.config.pipeline import PipelineConfig
from cvserve.config.server import ServerConfig

log = logging.getLogger("cvserve.config")

_BATCH_KEYS = {f.name for f in fields(BatchConfig)}
_MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"batching"}
_SERVER_KEYS = {f.name for f in fields(ServerConfig)} - {"models", "pipelines"}
_PIPELINE_KEYS = {f.name for f in fields(PipelineConfig)}

#: Old spellings of server keys: durations are milliseconds now (old key: new key, factor).
DEPRECATED_SERVER_KEYS: dict[str, tuple[str, float]] = {
    "drain_delay_s": ("drain_delay_ms", 1000.0),
    "drain_timeout_s": ("drain_timeout_ms", 1000.0),
}


def _renamed(section: dict[str, Any], where: str) -> dict[str, Any]:
    """``section`` with its deprecated keys in their new spelling, warning once for each."""
    out = dict(section)
    for old, (new, factor) in DEPRECATED_SERVER_KEYS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where}: {old} and {new} are the same setting: keep {new}")
        value = out.pop(old)
        bad = isinstance(value, bool) or not isinstance(value, int | float)
        out[new] = value if bad else value * factor  # a wrong type is refused by its check
        log.warning("%s: %s is deprecated (seconds): use %s: %s (milliseconds)",
                    where, old, new, out[new] if bad else f"{out[new]:g}")  # fmt: skip
    return out


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A model entry of a config file: ModelConfig keys and BatchConfig keys, flat."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a model entry needs at least a name: {d!r}")
    unknown = set(d) - _BATCH_KEYS - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"model {d['name']!r}: unknown keys {sorted(unknown)}; "
            f"known: {sorted(_BATCH_KEYS | _MODEL_KEYS)}"
        )
    try:
        batching = BatchConfig(**{k: v for k, v in d.items() if k in _BATCH_KEYS})
        return ModelConfig(batching=batching, **{k: v for k, v in d.items() if k in _MODEL_KEYS})
    except ConfigError:
        raise  # ModelConfig's own errors name the model already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {d['name']!r}: {e}") from None


def pipeline_config_from_dict(d: dict[str, Any]) -> PipelineConfig:
    """A pipeline entry of a config file: PipelineConfig keys."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"a pipeline entry needs at least a name: {d!r}")
    if "workers" in d:  # renamed: ``workers`` is now the server's process count
        raise ConfigError(
            f"pipeline {d['name']!r}: 'workers' is now 'stage_workers' (stage B workers in "
            "the server process; server: workers is the number of server processes)"
        )
    unknown = set(d) - _PIPELINE_KEYS
    if unknown:
        raise ConfigError(
            f"pipeline {d['name']!r}: unknown keys {sorted(unknown)}; known: {sorted(_PIPELINE_KEYS)}"
        )
    try:
        return PipelineConfig(**d)
    except ConfigError:
        raise  # PipelineConfig's own errors name the pipeline already
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pipeline {d['name']!r}: {e}") from None


def server_config_from_dict(d: dict[str, Any]) -> ServerConfig:
    if d is not None and not isinstance(d, dict):
        raise ConfigError(
            f"a config is a mapping with 'server', 'models' and 'pipelines'; got {type(d).__name__}"
        )
    d = dict(d or {})
    models = d.pop("models", None) or []
    pipelines = d.pop("pipelines", None) or []
    server = d.pop("server", None) or {}
    for key, value, kind in (("models", models, list), ("pipelines", pipelines, list),
                             ("server", server, dict)):  # fmt: skip
        if not isinstance(value, kind):
            raise ConfigError(f"{key!r} must be a {kind.__name__}, got {type(value).__name__}")
    if d:
        raise ConfigError(
            f"unknown top-level keys {sorted(d)}; expected 'server', 'models' and 'pipelines'"
        )
    server = _renamed(server, "server")
    unknown = set(server) - _SERVER_KEYS
    if unknown:
        raise ConfigError(f"server: unknown keys {sorted(unknown)}; known: {sorted(_SERVER_KEYS)}")
    if not models and not pipelines:
        raise ConfigError("the config serves nothing: add a 'models' or 'pipelines' list")
    mcs = tuple(model_config_from_dict(m) for m in models)
    pcs = tuple(pipeline_config_from_dict(p) for p in pipelines)
    for what, names in (("model", [m.name for m in mcs]), ("pipeline", [p.name for p in pcs])):
        if len(set(names)) != len(names):
            raise ConfigError(f"{what} names must be unique: {names}")
    both = sorted({m.name for m in mcs} & {p.name for p in pcs})
    if both:  # one name, one thing served: the front doors look names up in one table
        raise ConfigError(f"a model and a pipeline may not share a name: {both}")
    try:
        return ServerConfig(models=mcs, pipelines=pcs, **server)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"server: {e}") from None


def config_to_dict(config: ServerConfig) -> dict[str, Any]:
    """``config`` as a config file says it (``server_config_from_dict`` reads it back):
    how ``--workers`` hands its processes their settings, as JSON, never pickle."""

    def model(mc: ModelConfig) -> dict[str, Any]:
        d = asdict(mc)
        return {**d.pop("batching"), **d}

    server = asdict(config)
    del server["models"], server["pipelines"]
    return {
        "server": server,
        "models": [model(mc) for mc in config.models],
        "pipelines": [asdict(pc) for pc in config.pipelines],
    }


def load_config(path: str | Path) -> ServerConfig:
    """Read a YAML config file (see README, "Serving several models")."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    return server_config_from_dict(data or {})
