"""``cvserve tune``: find the server settings with the highest throughput whose p99
latency meets an SLO, by measuring real servers (like Triton's model_analyzer).

Every candidate is a real ``cvserve serve --config`` process with its settings, driven by
cvserve's own load generator in a closed-loop concurrency sweep (``tune.measure``): its
score is the best throughput among the points whose p99 met the SLO. The search
(``tune.search``) is coordinate descent from the defaults, one knob at a time in the order
that matters most (instances x intra-op threads within the cores, max batch, max delay,
intra-op threads, preprocessing threads, decoder), each direction stopped at the first
step that does not improve, within a wall-time budget. Every candidate goes to a state
file beside the output (``tune.state``) so a rerun reuses it; the winner is written as a
YAML config with a header saying what was measured (``tune.output``).
"""

from cvserve.tune.measure import ServerMeasurer, sweep
from cvserve.tune.runner import TuneConfig, TuneError, TuneReport, run_tune
from cvserve.tune.search import Candidate, Measurement, Search, SearchResult, Settings
from cvserve.tune.state import TuneState, TuneStateError, state_path

__all__ = [
    "Candidate",
    "Measurement",
    "Search",
    "SearchResult",
    "ServerMeasurer",
    "Settings",
    "TuneConfig",
    "TuneError",
    "TuneReport",
    "TuneState",
    "TuneStateError",
    "run_tune",
    "state_path",
    "sweep",
]
