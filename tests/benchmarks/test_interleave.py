"""``benchmarks/_interleave.py``: the variant order every comparing benchmark uses."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "_interleave.py"


def _variant_order():
    spec = importlib.util.spec_from_file_location("interleave_helper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.variant_order


def test_alternating_order_balances_every_pair_of_repeats():
    order = _variant_order()
    assert order(("a", "b", "c"), 0) == ["a", "b", "c"]
    assert order(("a", "b", "c"), 1) == ["c", "b", "a"]
    assert order(iter(["a", "b"]), 2) == ["a", "b"]  # any iterable, consumed once
    firsts = [order("ab", rep)[0] for rep in range(6)]
    assert firsts.count("a") == firsts.count("b") == 3


def test_rotated_order_puts_each_variant_in_each_place_once():
    order = _variant_order()
    rounds = [order(["a", "b", "c"], rep, rotate=True) for rep in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for place in range(3):
        assert sorted(r[place] for r in rounds) == ["a", "b", "c"]
    assert order([], 5, rotate=True) == []


def test_median_range_prints_the_spread_of_the_repeats():
    spec = importlib.util.spec_from_file_location("interleave_helper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.median_range([3.0, None, 1.0, 2.0]) == "2 [1-3]"
    assert module.median_range([None]) == "-" and module.median_range([0.12345]) == "0.123"
