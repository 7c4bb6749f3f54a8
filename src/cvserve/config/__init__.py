"""Typed configuration of models, pipelines and the server, from flags or a YAML file.

Every duration of the server, its models and pipelines is in milliseconds, in flags and
config keys alike, and its name says so (``timeout_ms``, ``--drain-delay-ms``); the old
spellings in seconds (``DEPRECATED_SERVER_KEYS``) are read with a one-line warning.
"""

from __future__ import annotations

from cvserve.config.checks import ConfigError
from cvserve.config.files import (
    DEPRECATED_SERVER_KEYS,
    config_to_dict,
    load_config,
    model_config_from_dict,
    pipeline_config_from_dict,
    server_config_from_dict,
)
from cvserve.config.flags import (
    server_config_from_args,
    worker_config_from_args,
    worker_trace_settings,
)
from cvserve.config.model import (
    PREPROCESS_DEVICES,
    RUNTIMES,
    BatchConfig,
    ModelConfig,
    parse_version_policy,
    queue_wait_ms,
    select_versions,
)
from cvserve.config.pipeline import PIPELINE_KINDS, PRESETS, PipelineConfig
from cvserve.config.server import (
    DEFAULT_MAX_BODY_BYTES,
    MODEL_CONTROL_MODES,
    TRACE_EXPORTERS,
    ServerConfig,
    available_memory,
    default_pixels_in_flight,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEPRECATED_SERVER_KEYS",
    "MODEL_CONTROL_MODES",
    "TRACE_EXPORTERS",
    "PRESETS",
    "PIPELINE_KINDS",
    "PREPROCESS_DEVICES",
    "RUNTIMES",
    "BatchConfig",
    "ConfigError",
    "ModelConfig",
    "PipelineConfig",
    "ServerConfig",
    "available_memory",
    "config_to_dict",
    "default_pixels_in_flight",
    "load_config",
    "model_config_from_dict",
    "parse_version_policy",
    "pipeline_config_from_dict",
    "queue_wait_ms",
    "select_versions",
    "server_config_from_args",
    "server_config_from_dict",
    "worker_config_from_args",
    "worker_trace_settings",
]
