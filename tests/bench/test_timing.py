"""Server-Timing as the bench reads it: trace.format_server_timing round-trips through
trace.parse_server_timing, and malformed entries are ignored and counted."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.trace import SERVER_STAGES, format_server_timing, parse_server_timing


@pytest.mark.parametrize("seed", range(5))
def test_round_trip(seed):
    rng = np.random.default_rng(seed)
    names = rng.choice(SERVER_STAGES, size=rng.integers(1, len(SERVER_STAGES)), replace=False)
    stages = {str(n): float(rng.uniform(0, 2.0)) for n in names}
    parsed, bad = parse_server_timing(format_server_timing(stages))
    assert bad == 0
    assert parsed.keys() == stages.keys()
    for name, seconds in stages.items():
        assert parsed[name] == pytest.approx(seconds, abs=1e-6)  # the header keeps µs


def test_malformed_entries_are_skipped_and_counted():
    header = (
        "recv;dur=1.5, bogus;dur=2, decode, infer;dur=abc, ;dur=3, "
        'encode;desc="x";dur="0.25", queue;dur=-1, resize;dur=nan, ,'
    )
    parsed, bad = parse_server_timing(header)
    assert parsed == pytest.approx({"recv": 0.0015, "encode": 0.00025})
    assert bad == 6
    assert parse_server_timing(None) == ({}, 0)
    assert parse_server_timing("") == ({}, 0)
