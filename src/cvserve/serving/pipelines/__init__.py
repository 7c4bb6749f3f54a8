"""Multi-DNN pipelines declared as data (``config.graph``): steps run in the serving
process or, over a broker, by workers (in-process or ``cvserve worker`` processes) that
batch the items of every request; each request's answer is joined from its steps."""

from __future__ import annotations

from cvserve.config.pipeline import PRESETS
from cvserve.serving.pipelines.base import StageOptions

__all__ = ["KINDS", "StageOptions"]

#: The pipelines cvserve ships (``config/presets``), besides ``graph`` (one's own steps).
KINDS = PRESETS
