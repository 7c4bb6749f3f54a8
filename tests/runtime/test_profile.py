"""``cvserve profile`` / ``measure_profile``: a real runtime measured into a loadable profile."""

from __future__ import annotations

import json
import sys

import pytest

from cvserve.cli import main
from cvserve.runtime import SimProfile, SimulatedRuntime
from cvserve.runtime.profile import measure_profile, profile_table


@pytest.fixture(scope="module")
def resnet_path(model_cache):
    from cvserve.models import store

    return store.model_path(store.load_meta("tiny-resnet", model_cache), model_cache)


def test_measure_profile_describes_where_its_numbers_come_from(resnet_path):
    seen = []
    p = measure_profile(
        resnet_path, [4, 1, 2], repeats=3, threads=1, model="tiny-resnet",
        progress=lambda b, s: seen.append((b, s)),
    )  # fmt: skip
    assert p.batch_sizes == [1, 2, 4] and [b for b, _ in seen] == [1, 2, 4]
    assert all(ms > 0 for ms in p.latency_ms.values())
    assert p.latency_ms[1] == pytest.approx(seen[0][1] * 1000.0)
    assert p.source.startswith("measured by cvserve profile on ")
    assert "onnxruntime" in p.source and "1 threads" in p.source
    assert p.model == "tiny-resnet" and p.input_shape == [None, 3, 32, 32]
    assert p.input_dtype == "float32" and p.machine["cores"] >= 1
    lo, hi = p.extra["measured"]["min_max_ms"]["2"]
    assert lo <= p.latency_ms[2] <= hi
    table = profile_table(p)
    assert len(table) == 4 and all(len(line) <= 80 for line in table)
    with pytest.raises(ValueError, match="positive"):
        measure_profile(resnet_path, [0, 1])


LONG_CPU = "Intel(R) Xeon(R) Platinum 8480+ Processor with a very long name, 56 cores @ 2.0GHz"


def test_cli_profile_writes_a_profile_the_simulator_loads(
    model_cache, tmp_path, capsys, monkeypatch
):
    # The table fits 80 columns whatever CPU this runs on: give it a long name.
    from cvserve.machine import machine_info

    monkeypatch.setattr(sys.modules[machine_info.__module__], "_cpu_model", lambda: LONG_CPU)
    out = tmp_path / "tiny.json"
    rc = main(
        ["profile", "tiny-resnet", "--cache-dir", str(model_cache), "--batch-sizes", "1,2",
         "--repeats", "2", "--intra-op-threads", "1", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ms/batch" in printed and all(len(line) <= 80 for line in printed.splitlines())
    assert LONG_CPU in " ".join(printed.split())  # wrapped, not cut
    doc = json.loads(out.read_text())
    assert doc["schema"] == "cvserve.profile/1" and set(doc["latency_ms"]) == {"1", "2"}
    assert doc["model"] == "tiny-resnet" and "measured by cvserve profile" in doc["source"]
    profile = SimProfile.parse(str(out))
    assert profile.latency_ms == {int(b): ms for b, ms in doc["latency_ms"].items()}

    from cvserve.models import store

    path = store.model_path(store.load_meta("tiny-resnet", model_cache), model_cache)
    rt = SimulatedRuntime(path, str(out))
    assert rt.device.profile.source == doc["source"]
