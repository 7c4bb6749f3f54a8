"""The CPU budget a pipeline's stages share: who runs wide, who waits, what is counted."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cvserve.runtime.budget import BudgetedRuntime, CpuBudget, available_cores


def _hold(budget: CpuBudget, stage: str, want: int, started: threading.Event, go: threading.Event):
    """A thread that takes cores, says how many, and holds them until ``go``."""
    got: list[int] = []

    def run():
        with budget.take(stage, want) as n:
            got.append(n)
            started.set()
            go.wait(10)

    t = threading.Thread(target=run)
    t.start()
    return t, got


def test_a_call_alone_runs_wide_and_a_call_beside_another_runs_on_one_core():
    budget = CpuBudget(4)
    started, go = threading.Event(), threading.Event()
    t, got = _hold(budget, "det", 4, started, go)
    assert started.wait(10)
    go.set()
    t.join()
    assert got == [4]  # alone: the whole budget

    started, go = threading.Event(), threading.Event()
    t, first = _hold(budget, "det", 4, started, go)
    assert started.wait(10) and first == [4]
    # the machine is taken: the next call waits; at its turn it is alone, so runs wide
    s2, g2 = threading.Event(), threading.Event()
    t2, second = _hold(budget, "rec", 4, s2, g2)
    assert not s2.wait(0.2)
    go.set()
    assert s2.wait(10)
    g2.set()
    t.join()
    t2.join()
    assert second == [4]

    # beside a running call (a one-core one here), a call runs on one core at once
    started, go = threading.Event(), threading.Event()
    t, first = _hold(budget, "det", 1, started, go)
    assert started.wait(10) and first == [1]
    s2, g2 = threading.Event(), threading.Event()
    t2, second = _hold(budget, "rec", 4, s2, g2)
    assert s2.wait(10) and second == [1]
    go.set()
    g2.set()
    t.join()
    t2.join()
    use = budget.snapshot()["stages"]
    assert use["rec"]["wait_s"] > 0
    assert use["det"]["calls"] == 3 and use["rec"]["calls"] == 2
    assert use["rec"]["wide_share"] == 0.5


def test_calls_beside_a_narrow_one_share_the_rest_and_the_next_waits_its_turn():
    budget = CpuBudget(2, pressure=lambda: 3)  # three requests in flight: nobody runs wide
    evs = [(threading.Event(), threading.Event()) for _ in range(3)]
    a, got_a = _hold(budget, "det", 2, *evs[0])
    assert evs[0][0].wait(10)
    b, got_b = _hold(budget, "rec", 2, *evs[1])
    assert evs[1][0].wait(10)
    assert got_a == [1] and got_b == [1]  # under pressure: one core each, both run
    assert budget.snapshot()["free"] == 0
    c, got_c = _hold(budget, "det", 2, *evs[2])
    assert not evs[2][0].wait(0.2)  # no core left: it waits
    evs[1][1].set()
    assert evs[2][0].wait(10) and got_c == [1]
    for _, go in evs:
        go.set()
    for t in (a, b, c):
        t.join()
    snap = budget.snapshot()
    assert snap["free"] == 2
    assert snap["stages"]["det"]["wide_share"] == 0.0
    assert snap["stages"]["det"]["mean_width"] == 1.0


def test_waiters_are_served_in_arrival_order():
    budget = CpuBudget(1)
    order: list[int] = []
    started, go = threading.Event(), threading.Event()
    holder, _ = _hold(budget, "det", 1, started, go)
    assert started.wait(10)

    def waiter(i: int):
        with budget.take("rec", 1):
            order.append(i)

    threads = []
    for i in range(5):
        t = threading.Thread(target=waiter, args=(i,))
        t.start()
        threads.append(t)
        # each is in line before the next starts (the line is visible in its length)
        for _ in range(1000):
            if len(budget._line) == i + 1:
                break
            threading.Event().wait(0.001)
    go.set()
    for t in [holder, *threads]:
        t.join()
    assert order == [0, 1, 2, 3, 4]


def test_waiting_is_reported_to_the_thread_that_waited_once():
    budget = CpuBudget(1)
    started, go = threading.Event(), threading.Event()
    holder, _ = _hold(budget, "det", 1, started, go)
    assert started.wait(10)
    waited: list[float] = []

    def waiter():
        with budget.take("rec", 1):
            pass
        waited.append(budget.pop_waited())
        waited.append(budget.pop_waited())

    t = threading.Thread(target=waiter)
    t.start()
    threading.Event().wait(0.1)
    go.set()
    t.join()
    holder.join()
    assert waited[0] > 0 and waited[1] == 0.0
    assert budget.pop_waited() == 0.0  # this thread never waited


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="at least one core"):
        CpuBudget(-2)
    assert CpuBudget(0).cores == available_cores()


@pytest.fixture(scope="module")
def resnet_path(model_cache):
    from cvserve.models import store

    return str(store.model_path(store.load_meta("tiny-resnet", model_cache), model_cache))


def test_budgeted_runtime_answers_like_onnxruntime_at_every_width(resnet_path):
    from cvserve.runtime import OrtRuntime

    budget = CpuBudget(2)
    rt = BudgetedRuntime(resnet_path, budget, "cls")
    assert rt.widths == [1, 2]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    want = OrtRuntime(resnet_path).run(x)[0]
    wide = rt.run(x)[0]  # alone: wide
    budget.pressure = lambda: 2
    narrow = rt.run(x)[0]  # under pressure: one core
    np.testing.assert_allclose(wide, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(narrow, want, rtol=1e-5, atol=1e-5)
    use = budget.snapshot()["stages"]["cls"]
    assert use["calls"] == 2 and use["wide_share"] == 0.5
    assert BudgetedRuntime(resnet_path, CpuBudget(1), "cls").widths == [1]
    assert BudgetedRuntime(resnet_path, CpuBudget(4), "cls", max_width=2).widths == [1, 2]
