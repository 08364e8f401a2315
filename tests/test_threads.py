"""The CPU thread policy (bench.threads): auto leaves the cores other processes take, fixed counts, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bench import threads
from bench.errors import UserError


def test_auto_gives_each_model_the_cores_others_leave(monkeypatch):
    monkeypatch.delenv("BENCH_THREADS", raising=False)
    monkeypatch.setattr(threads, "available", lambda: 4)
    for others, want in [(0.0, 4), (1.0, 3), (2.0, 2), (3.0, 1), (7.0, 1), (1.4, 3), (1.6, 2)]:
        monkeypatch.setattr(threads, "other_runnable", lambda o=others: o)
        n, why = threads.choose(None)
        assert n == want and why.startswith("auto: ") and f"{want} of 4" in why
    monkeypatch.setattr(threads, "other_runnable", lambda: None)
    assert threads.choose(None)[0] == 4  # no run queue to read: every core


def test_fixed_all_and_the_environment_default(monkeypatch):
    monkeypatch.setattr(threads, "available", lambda: 2)
    assert threads.choose(3) == (3, "threads=3") and threads.choose("1") == (1, "threads=1")
    assert threads.choose("all") == (2, "threads=all")
    monkeypatch.setenv("BENCH_THREADS", "1")
    assert threads.choose(None) == (1, "threads=1")
    assert threads.choose(2) == (2, "threads=2")  # threads= beats the environment


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "", " "])
def test_a_bad_count_is_one_line(bad):
    with pytest.raises(UserError, match="threads=auto"):
        threads.parse(bad)


def test_using_sets_and_restores_the_pool_and_says_what_to_record():
    before = torch.get_num_threads()
    with threads.using(torch.device("cpu"), 1) as env:
        assert torch.get_num_threads() == 1 and env == {"num_threads": 1, "thread_policy": "threads=1"}
    assert torch.get_num_threads() == before
    with threads.using(torch.device("cuda"), 1) as env:
        assert env == {}


def test_the_run_queue_counts_a_busy_process():
    if threads.other_runnable() is None:
        pytest.skip("no /proc/stat here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = max(threads.other_runnable(samples=9, gap_s=0.05) for _ in range(3))
    finally:
        busy.kill()
    assert seen >= 1


def test_the_record_names_the_threads_and_a_bad_setting_stops_the_cli(tmp_path):
    env = {**os.environ, "BENCH_QUIET": "1"}
    res = subprocess.run([sys.executable, "-m", "bench", "run", "scale=tiny", "model=pixel_independent",
                          f"out={tmp_path}", "threads=0"], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "threads=" in res.stderr
    assert list(tmp_path.iterdir()) == []
    from bench.config import load_config
    from bench.runner import run

    outcome = run(load_config(["scale=tiny", "model=pixel_independent", f"out={tmp_path}", "threads=1"]))
    (record, _), = outcome.records
    assert record.env["num_threads"] == 1 and record.env["thread_policy"] == "threads=1"
