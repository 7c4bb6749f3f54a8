"""Ctrl-C during a sweep keeps the finished points, ``resume`` measures only the rest, and
the progress line counts the errors the table counts (not the warm-up's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from cvserve.bench import BenchConfig, BenchInterrupted, load_result, run_bench, save_result

QUICK = dict(warmup=0.2, window=0.25)


def test_the_progress_error_count_is_the_tables(fake_url, tiny_images):
    events = []
    cfg = BenchConfig(url=fake_url, model="flaky", images=tiny_images, concurrency=[2],
                      requests=45, **QUICK)  # fmt: skip
    (p,) = run_bench(cfg, progress=events.append).points
    assert 0 < p.errors["total"] < p.requests
    assert all(e["errors"] == 0 for e in events if e["warming_up"])  # flaky fails 1 in 3
    (end,) = [e for e in events if e["event"] == "end"]
    assert end["errors"] == p.errors["total"]
    ticks = [e["errors"] for e in events if e["event"] == "tick" and not e["warming_up"]]
    assert ticks == sorted(ticks) and all(t <= p.errors["total"] for t in ticks)


def test_an_interrupted_sweep_keeps_its_points_and_resumes(fake_url, tiny_images, tmp_path):
    cfg = BenchConfig(url=fake_url, model="echo", images=tiny_images, concurrency=[1, 2, 3],
                      duration=0.3, **QUICK)  # fmt: skip
    saved = []

    def interrupt_at_the_second_point(event: dict) -> None:
        if event["point"] == 1 and event["event"] == "start":
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does

    with pytest.raises(BenchInterrupted) as info:
        run_bench(cfg, progress=interrupt_at_the_second_point, on_point=saved.append)
    first = info.value.result
    assert [p.concurrency for p in first.points] == [1]
    assert len(saved) == 1 and saved[0].points[0] == first.points[0]
    path = save_result(first, tmp_path / "partial.json")

    whole = run_bench(cfg, resume=load_result(path))
    assert [p.concurrency for p in whole.points] == [1, 2, 3]
    assert whole.points[0] == first.points[0]  # kept, not measured again
    assert set(whole.rows["point"]) == {0, 1, 2}
    with pytest.raises(Exception, match="not a point of this sweep"):
        other = BenchConfig(url=fake_url, model="echo", images=tiny_images,
                            concurrency=[4, 2], duration=0.3, **QUICK)  # fmt: skip
        run_bench(other, resume=load_result(path))


def test_ctrl_c_in_the_cli_writes_the_partial_result_and_resume_finishes(
    fake_url, data_dir, tmp_path
):
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "cvserve", "bench", "--url", fake_url, "--model", "echo",
           "--images", str(data_dir / "images" / "small"), "--concurrency", "1,2,3",
           "--duration", "1", "--warmup-ms", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.exists():  # written after every point
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    kept = load_result(out)
    assert 1 <= len(kept.points) < 3
    assert f"interrupted: kept {len(kept.points)} finished points in {out}" in err
    assert "--resume" in err and "Traceback" not in err
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {len(kept.points)} points measured already" in r.stderr
    done = load_result(out)
    assert [p.concurrency for p in done.points] == [1, 2, 3]
    assert done.points[: len(kept.points)] == kept.points
