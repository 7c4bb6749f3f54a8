"""Trace: contiguous stages that add up to the elapsed time, and the Server-Timing header
that carries them (format, parse, the ``sim=1`` flag)."""

from __future__ import annotations

import math

import pytest

from cvserve.trace import (
    SERVER_STAGES,
    STAGES,
    Trace,
    format_server_timing,
    parse_server_timing,
    server_timing_simulated,
)

# Times chosen to be exact in binary floating point, so sums compare with ==.
T0 = 1000.0


def test_marks_are_contiguous_and_add_up_to_the_elapsed_time():
    t = Trace(start=T0)
    assert t.last == T0 and t.stages == {} and t.total == 0.0
    assert t.mark("recv", T0 + 0.5) == T0 + 0.5
    t.mark("queue", T0 + 0.75)
    t.mark("decode", T0 + 1.0)
    t.mark("infer", T0 + 3.0)
    assert t.stages == {"recv": 0.5, "queue": 0.25, "decode": 0.25, "infer": 2.0}
    assert list(t.stages) == ["recv", "queue", "decode", "infer"]  # request order
    assert t.total == t.last - t.start == 3.0


def test_add_and_advance_charge_work_measured_elsewhere_once():
    """A worker thread measures ``infer`` itself: ``add`` charges it, ``advance`` moves the
    mark past it, and the next ``mark`` charges only what came after."""
    t = Trace(start=T0)
    t.mark("queue", T0 + 1.0)
    t.add("infer", 2.0)
    t.advance(T0 + 3.0)
    t.mark("encode", T0 + 3.5)
    assert t.stages == {"queue": 1.0, "infer": 2.0, "encode": 0.5}
    assert t.total == t.last - t.start == 3.5


def test_advance_never_moves_the_mark_back():
    t = Trace(start=T0)
    t.mark("recv", T0 + 2.0)
    t.advance(T0 + 1.0)
    assert t.last == T0 + 2.0
    t.mark("queue", T0 + 2.5)
    assert t.stages["queue"] == 0.5


def test_a_stage_charged_twice_accumulates_and_negative_time_counts_as_zero():
    t = Trace(start=T0)
    t.add("broker", 0.25)
    t.add("broker", 0.5)
    t.add("decode", -1.0)  # a clock step must not make a stage negative
    assert t.stages == {"broker": 0.75, "decode": 0.0}


def test_an_unknown_stage_raises_and_charges_nothing():
    t = Trace(start=T0)
    t.mark("recv", T0 + 1.0)
    with pytest.raises(ValueError, match=r"unknown stage 'preprocess'; stages are recv, queue"):
        t.mark("preprocess", T0 + 2.0)
    with pytest.raises(ValueError, match="unknown stage 'network_'"):
        t.add("network_", 1.0)
    assert t.stages == {"recv": 1.0}
    assert t.last == T0 + 1.0  # the failed mark did not move the mark either
    t.mark("decode", T0 + 2.0)
    assert t.stages["decode"] == 1.0


def test_default_start_is_now():
    import time

    before = time.perf_counter()
    t = Trace()
    after = time.perf_counter()
    assert before <= t.start <= after and t.last == t.start
    assert t.simulated is False


def test_the_vocabulary():
    assert len(set(STAGES)) == len(STAGES)
    assert STAGES[0] == "recv" and STAGES[-1] == "network"
    # The server measures everything but the network (the client's share).
    assert SERVER_STAGES == STAGES[:-1]


# --- Server-Timing ----------------------------------------------------------------------


def test_format_writes_milliseconds_in_stage_order():
    value = format_server_timing({"recv": 0.0015, "infer": 0.012, "encode": 0.0})
    assert value == "recv;dur=1.500, infer;dur=12.000, encode;dur=0.000"
    assert format_server_timing({}) == ""


def test_format_and_parse_round_trip_every_stage():
    stages = {name: (i + 1) * 0.0012345 for i, name in enumerate(STAGES)}
    got, bad = parse_server_timing(format_server_timing(stages))
    assert bad == 0
    assert list(got) == list(STAGES)
    for name, seconds in stages.items():
        # three decimals of a millisecond: within half a microsecond
        assert abs(got[name] - seconds) <= 0.5e-6 + 1e-12, name


def test_a_trace_round_trips_through_its_header():
    t = Trace(start=T0)
    t.mark("recv", T0 + 0.001)
    t.mark("decode", T0 + 0.004)
    got, bad = parse_server_timing(t.server_timing())
    assert bad == 0
    assert got == pytest.approx(t.stages, abs=0.5e-6)


def test_parse_counts_malformed_and_unknown_entries_instead_of_raising():
    header = ", ".join(
        [
            "recv;dur=1.5",  # good
            "queue",  # no dur
            "decode;dur=abc",  # not a number
            "resize;dur=-2",  # negative
            "normalize;dur=nan",  # not a number either
            "bogus;dur=3",  # not a stage
            "Infer;dur=2",  # stage names are case-sensitive
            ";dur=1",  # no name
            "",  # empty entries are skipped, not counted
            'infer;desc="x";DUR="2.5"',  # params in any order, any case, quoted
        ]
    )
    stages, bad = parse_server_timing(header)
    assert stages == {"recv": 0.0015, "infer": 0.0025}
    assert bad == 7


def test_parse_sums_a_stage_named_twice():
    stages, bad = parse_server_timing("broker;dur=1, infer;dur=2, broker;dur=0.5")
    assert bad == 0 and stages == {"broker": 0.0015, "infer": 0.002}


@pytest.mark.parametrize("value", [None, "", " ", ",,"])
def test_parse_nothing(value):
    assert parse_server_timing(value) == ({}, 0)


def test_parse_rejects_an_infinite_duration():
    stages, bad = parse_server_timing("recv;dur=inf, infer;dur=1")
    assert all(math.isfinite(v) for v in stages.values())
    assert bad == 1


# --- the simulated flag -----------------------------------------------------------------


def test_a_simulated_trace_flags_its_infer_entry_only():
    t = Trace(start=T0)
    t.mark("decode", T0 + 0.001)
    t.mark("infer", T0 + 0.003)
    t.mark("encode", T0 + 0.004)
    assert "sim" not in t.server_timing()
    assert not server_timing_simulated(t.server_timing())
    t.simulated = True
    value = t.server_timing()
    assert value == "decode;dur=1.000, infer;dur=2.000;sim=1, encode;dur=1.000"
    assert server_timing_simulated(value)
    assert server_timing_simulated(value.encode("latin-1"))  # raw header bytes
    # the flag is a parameter: parsing ignores it and the durations are unchanged
    assert parse_server_timing(value) == parse_server_timing(format_server_timing(t.stages))
    assert parse_server_timing(value)[1] == 0


def test_format_without_infer_has_nowhere_to_put_the_flag():
    value = format_server_timing({"recv": 0.001}, simulated=True)
    assert value == "recv;dur=1.000"
    assert not server_timing_simulated(value)


@pytest.mark.parametrize(
    ("value", "simulated"),
    [
        ("infer;dur=2;sim=1", True),
        ('infer;dur=2;SIM="1"', True),
        ("infer;dur=2; sim = 1 ", True),
        ("infer;dur=2;sim=0", False),
        ("infer;dur=2;sim", False),
        ("infer;dur=2;simulated=1", False),
        ("sim;dur=1", False),  # a name, not a parameter
        ("infer;dur=2", False),
        ("", False),
        (None, False),
        (b"recv;dur=1, infer;dur=2;sim=1", True),
    ],
)
def test_server_timing_simulated(value, simulated):
    assert server_timing_simulated(value) is simulated
