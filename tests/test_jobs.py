"""Models side by side (bench.jobs): the policy, the same numbers as one at a time, shared work made once."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import estimate, fileio, jobs, threads
from bench.errors import UserError
from bench.metrics import METRICS


def _plan(jobs_value=None, threads_value=None, device="cpu"):
    cfg = SimpleNamespace(jobs=jobs_value, threads=threads_value)
    return SimpleNamespace(cfg=cfg, device=torch.device(device), metrics=[])


def test_auto_runs_as_many_models_as_the_cores_one_thread_each_whatever_the_load(monkeypatch):
    monkeypatch.delenv("BENCH_THREADS", raising=False)
    monkeypatch.setattr(threads, "available", lambda: 2)
    monkeypatch.setattr(threads, "other_runnable", lambda: 0.0)
    n, per, why = jobs.choose(_plan(), 9)
    assert (n, per) == (2, 1) and why.startswith("jobs=auto: 2 models at a time, 1 thread(s) each")
    assert jobs.choose(_plan(), 1)[:2] == (1, None)  # one model: the thread policy as before
    # busy neighbours: one-thread workers still take a core each and share the CPU fairly with them
    monkeypatch.setattr(threads, "other_runnable", lambda: 2.0)
    n, per, why = jobs.choose(_plan(), 9)
    assert (n, per) == (2, 1) and "2 other runnable" in why
    monkeypatch.setattr(threads, "other_runnable", lambda: 0.0)
    assert jobs.choose(_plan(threads_value="2"), 9)[:2] == (1, None)  # two threads a model fill the two cores
    monkeypatch.setattr(threads, "available", lambda: 4)
    assert jobs.choose(_plan(threads_value="2"), 9)[:2] == (2, 2)


def test_a_fixed_count_and_one_at_a_time(monkeypatch):
    monkeypatch.delenv("BENCH_THREADS", raising=False)
    monkeypatch.setattr(threads, "available", lambda: 2)
    monkeypatch.setattr(threads, "other_runnable", lambda: 0.0)
    assert jobs.choose(_plan("1"), 9)[:2] == (1, None)
    assert jobs.choose(_plan("3"), 9)[:2] == (3, 1)  # asked for: oversubscribed, one thread each
    assert jobs.choose(_plan("3"), 2)[:2] == (2, 1)  # never more jobs than models
    with pytest.raises(UserError, match="jobs=1"):
        jobs.choose(_plan("2", device="cuda"), 9)
    assert jobs.choose(_plan(None, device="cuda"), 9)[:2] == (1, None)


def test_a_timed_metric_has_the_cpu_to_itself(monkeypatch):
    monkeypatch.setattr(threads, "available", lambda: 2)
    monkeypatch.setattr(threads, "other_runnable", lambda: 0.0)
    p = _plan()
    p.metrics = [METRICS.get("accuracy"), METRICS.get("throughput")]
    n, per, why = jobs.choose(p, 9)
    assert (n, per) == (1, None) and "throughput is timed" in why
    p.cfg.jobs = "2"
    with pytest.raises(UserError, match="throughput is timed"):
        jobs.choose(p, 9)


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "", " "])
def test_a_bad_count_is_one_line(bad):
    with pytest.raises(UserError, match="jobs=auto"):
        jobs.parse(bad)


def test_the_plan_total_is_the_longest_first_makespan():
    assert estimate.makespan([3, 5, 3, 4, 3], 2) == 10.0  # 5|4, then 5|7, 8|7, 8|10: longest first, soonest free
    assert estimate.makespan([10, 1, 1], 2) == 10.0
    assert estimate.makespan([3, 3, 3, 3], 2) == 6.0
    assert estimate.makespan([7], 4) == 7.0
    assert estimate.makespan([], 2) == 0.0
    assert estimate.makespan([5, 4, 3], 2, first=4) == 8.0  # 4|0 (the extractor first): 4|5, 8|5, 8|8
    assert estimate.makespan([10, 1, 1], 2, first=3) == 10.0


def test_the_plan_total_runs_the_extractor_as_a_job_of_its_own_only_side_by_side():
    es = [estimate.Estimate(n, 10, s, "calibrated") for n, s in (("a", 600.0), ("b", 500.0), ("c", 300.0))]
    extras = [estimate.Extra("extractor", 200.0, own_job=True), estimate.Extra("inception", 50.0)]
    assert estimate.total_s(es, extras, 2) == 900.0 + 50.0  # 200|600, 700|600, 700|900; Inception after
    assert estimate.total_s(es, extras, 1) == 600 + 500 + 300 + 200 + 50


def test_one_at_a_time_makes_shared_work_once(tmp_path):
    target, made = tmp_path / "features.bin", []

    def job():
        with fileio.one_at_a_time(target):
            if not target.exists():
                made.append(1)
                time.sleep(0.2)  # the other job arrives while this one computes
                fileio.atomic_write(target, lambda tmp: tmp.write_bytes(b"x"))

    workers = [threading.Thread(target=job) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert made == [1] and target.read_bytes() == b"x"


def test_an_unlockable_place_still_runs_the_block(tmp_path):
    ran = []
    with fileio.one_at_a_time(tmp_path / "missing-dir" / "f"):
        ran.append(1)
    assert ran == [1]


def _records(out: Path) -> dict[str, dict]:
    return {(r := json.loads(p.read_text()))["model"]: r for p in sorted(out.glob("*.json"))}


def test_two_at_a_time_gives_the_numbers_of_one_at_a_time(tmp_path):
    """The same models, seed and thread count, once with jobs=2 and once with jobs=1: equal metrics and
    protocols; the records say why each model had its threads, and come out in the plan's order."""
    models = "models=[wrn,pixel_independent,resflow]"
    common = [sys.executable, "-m", "bench", "run", models, "scale=tiny", "threads=1"]
    runs = {}
    for n in (2, 1):
        out = tmp_path / f"j{n}"
        got = subprocess.run(common + [f"jobs={n}", f"out={out}"], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "BENCH_QUIET": ""})
        assert got.returncode == 0, got.stderr[-2000:]
        runs[n] = (_records(out), got.stderr)
    side, alone = runs[2][0], runs[1][0]
    assert set(side) == set(alone) == {"wrn", "pixel_independent", "resflow"}
    for m in alone:
        assert {k: v["value"] for k, v in side[m]["metrics"].items()} == \
               {k: v["value"] for k, v in alone[m]["metrics"].items()}, m
        assert side[m]["protocol"] == alone[m]["protocol"]
        assert side[m]["env"]["num_threads"] == 1 and side[m]["env"]["thread_policy"].startswith("jobs=2: ")
        assert alone[m]["env"]["thread_policy"] == "threads=1"
    printed = re.findall(r"record: .*?hybrid_(\w+?)_digits_s0", runs[2][1].replace("\n", ""))
    assert printed == ["wrn", "pixel_independent", "resflow"]  # the plan's order, whichever finished first


class _DiesWhenLoaded:
    """Unpickled in the worker, it ends the worker's process at once, as a kill or the OOM killer would."""

    def __reduce__(self):
        return os._exit, (9,)


def test_a_worker_that_dies_fails_its_models_record_and_the_run_goes_on(tmp_path, monkeypatch):
    from bench.config import RunConfig
    from bench.plan import plan

    p = plan(RunConfig(models=["wrn", "pixel_independent"], scale="tiny", out=str(tmp_path)))
    poison = pickle.dumps(_DiesWhenLoaded())
    monkeypatch.setattr(jobs.pickle, "dumps", lambda obj: poison)  # the parent sends what kills its worker
    done = jobs.run_side_by_side(p, ["wrn", "pixel_independent"], 2, 1, "jobs=2: test")
    assert set(done) == {"wrn", "pixel_independent"}
    for name, (record, path, unwritten) in done.items():
        assert record.status == "failed" and "worker process died" in record.reason, name
        assert path is not None and path.is_file() and not unwritten
        assert json.loads(path.read_text())["status"] == "failed"


def test_longest_first_by_measured_totals_else_the_costly_metrics_models_first():
    E = estimate.Estimate
    p = SimpleNamespace(models=["a", "b", "c", "d"],
                        suite=SimpleNamespace(settings={"eps": [0.1], "autoattack": {"models": ["c", "d"]},
                                                        "refine": {"models": ["d"]}}))
    cold = [E("a", 10, 100.0, "calibrated"), E("b", 10, 50.0, "calibrated"), E("c", 10, 10.0, "calibrated"),
            E("d", 10, 5.0, "calibrated")]
    assert estimate.longest_first(p, cold) == ["d", "c", "a", "b"]  # named by two costly metrics, by one, none
    warm = [E("a", 10, 100.0, "recorded", 1.0), E("b", 10, 50.0, "recorded", 200.0),
            E("c", 10, 10.0, "recorded", 20.0), E("d", None, 0.0, "cached", 35.0)]
    assert estimate.longest_first(p, warm) == ["b", "a", "d", "c"]
    assert estimate.longest_first(p, []) == ["d", "c", "a", "b"]  # no estimates (a smoke): the costly first
    # a cold plan knows the samplers' sampling: a long one goes before a longer training that draws nothing
    p.suite.settings = {}
    cold = [E("a", 10, 100.0, "calibrated"), E("b", 10, 60.0, "calibrated", 80.0, "calibrated sampling")]
    assert estimate.longest_first(p, cold) == ["b", "a", "c", "d"]


def test_a_cold_run_on_new_data_trains_the_extractor_once_as_its_own_first_job(tmp_path):
    """New data: side by side, the extractor is trained once, in a job of its own started before the models, and
    every model's FID reads that extractor."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = (rng.random((120, 8, 8, 1)) * 60 + y[:, None, None, None] * 60).astype(np.uint8)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    out = tmp_path / "out"
    got = subprocess.run([sys.executable, "-m", "bench", "run", "models=[pixel_independent,vae]", "scale=tiny",
                          "suite=hybrid", f"data=npz:{tmp_path / 'set.npz'}", "jobs=2", "threads=1", f"out={out}"],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "BENCH_QUIET": "", "BENCH_CACHE": str(tmp_path / "cache")})
    assert got.returncode == 0, got.stderr[-2000:]
    assert "feature extractor" in got.stderr  # the plan's line
    finished = [line for line in got.stderr.splitlines() if line.startswith("train extractor") and "(100%)" in line]
    assert len(finished) == 1, got.stderr[-2000:]
    assert len(list((tmp_path / "cache" / "extractors").glob("*.safetensors"))) == 1
    records = _records(out)
    assert set(records) == {"pixel_independent", "vae"} and all(r["status"] == "ok" for r in records.values())
    (extractor,) = {json.dumps(r["protocol"]["feature_extractor"], sort_keys=True) for r in records.values()}
