"""bench.allocator: glibc keeps freed memory for reuse, so a tensor allocated and freed over and over stops
costing fresh pages (counted as minor page faults); BENCH_MALLOC=default leaves malloc alone. Each case runs in
a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, resource, sys
import torch
from bench.allocator import keep_freed_memory, malloc_state
before = malloc_state()
state = keep_freed_memory()
assert keep_freed_memory() == state  # once per process
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.LeakyReLU(0.2),
                          torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.LeakyReLU(0.2),
                          torch.nn.Conv2d(32, 1, 3, padding=1))
x = torch.randn(16, 3, 64, 64)
def churn():  # SGLD steps: the activations (8 MiB each) of a forward, the input gradient, all freed
    global x
    for _ in range(5):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(net(x).sum(), x)
        x = (x.detach() - 0.01 * grad).detach()
churn()
churn()  # the heap has grown to the steps' size
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(json.dumps({"before": before, "state": state, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def probe(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_memory_is_reused_without_new_pages():
    tuned, default = probe(), probe(BENCH_MALLOC="default")
    assert tuned["before"].startswith("default") and tuned["state"].startswith("glibc: freed memory reused")
    assert default["state"] == "default (BENCH_MALLOC=default)"
    # glibc's default returns the freed activations to the kernel and faults them back in at every step (the
    # probe tells the two apart); reused memory faults a small fraction of that (0 here; 4,096 once in CI)
    assert default["faults"] > 10_000, default
    assert tuned["faults"] * 5 < default["faults"], (tuned, default)


def _worker_state() -> str:
    from bench.allocator import malloc_state

    return malloc_state()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_the_model_workers_reuse_freed_memory_too():
    """The side-by-side workers (bench.jobs) set it up as the runner does."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bench import jobs

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=jobs._init) as pool:
        assert pool.submit(_worker_state).result(timeout=120).startswith("glibc: freed memory reused")


def test_a_bad_setting_is_refused_and_the_record_says_what_malloc_does(monkeypatch):
    import jsonschema
    import torch

    from bench import allocator
    from bench.errors import UserError
    from bench.results.records import env_info

    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv("BENCH_MALLOC", "off")
    with pytest.raises(UserError, match="BENCH_MALLOC='off' is not a setting"):
        allocator.keep_freed_memory()
    monkeypatch.setenv("BENCH_MALLOC", "default")
    assert allocator.keep_freed_memory() == "default (BENCH_MALLOC=default)"
    env = env_info(torch.device("cpu"))
    assert env["malloc"] == "default (BENCH_MALLOC=default)"
    schema = json.loads((ROOT / "docs" / "record.schema.json").read_text())
    jsonschema.validate(env, {**schema["$defs"]["env"], "$defs": schema["$defs"]})
